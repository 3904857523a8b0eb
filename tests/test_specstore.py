"""The spec file on /etc/pve: changes under the cluster lock, atomic, and only when needed."""

import os
import threading
import time

import pytest

from pve_vhost_agent.model import spec
from pve_vhost_agent.errors import AgentTimeout, ExitCode, SpecError
from pve_vhost_agent.formats.specfile import format_spec
from pve_vhost_agent.adapters.specstore import load_spec, update_spec

NIC = spec.VhostNic(100, 1, "br-dpdk", "02:00:00:00:01:01")
TAP = spec.TapQinQ(100, 0, spec.QinQ(200))


def add(entry):
    return lambda cluster: cluster.with_entry(entry)


def test_missing_file_is_an_empty_spec(pve_root):
    assert load_spec(pve_root.settings()) == spec.ClusterSpec()


def test_update_writes_the_formatted_spec_and_releases_the_lock(pve_root):
    settings = pve_root.settings()
    update = update_spec(settings, add(NIC))
    assert update.changed
    assert pve_root.spec_file.read_text() == format_spec(spec.ClusterSpec((NIC,)))
    update_spec(settings, add(TAP))
    assert load_spec(settings) == spec.ClusterSpec((NIC,), (TAP,))
    assert not settings.cluster_lock_dir.exists()
    assert sorted(os.listdir(pve_root.spec_file.parent)) == ["nodes", "priv", "pve-vhost-agent.cfg", "qemu-server"]


def test_unchanged_spec_is_not_rewritten(pve_root):
    # A hand-formatted file that means the same spec stays as the user wrote it.
    text = "# edge routers\nqinq: 100-net0\n    qinq 200\n"
    pve_root.spec_file.write_text(text)
    inode = pve_root.spec_file.stat().st_ino
    update = update_spec(pve_root.settings(), add(TAP))
    assert not update.changed
    assert pve_root.spec_file.read_text() == text
    assert pve_root.spec_file.stat().st_ino == inode


def test_held_cluster_lock_times_out_and_is_left_to_its_holder(pve_root):
    settings = pve_root.settings(lock_timeout=0.5)
    update_spec(settings, add(NIC))
    before = pve_root.spec_file.read_bytes()
    settings.cluster_lock_dir.mkdir()  # another node holds the lock
    started = time.monotonic()
    with pytest.raises(AgentTimeout) as caught:
        update_spec(settings, add(TAP))
    waited = time.monotonic() - started
    assert 0.5 <= waited < 2.5
    message = str(caught.value)
    assert str(settings.cluster_lock_dir) in message and "120 s" in message
    assert caught.value.exit_code == ExitCode.TIMEOUT
    assert pve_root.spec_file.read_bytes() == before
    assert settings.cluster_lock_dir.is_dir()  # never break someone else's lock
    settings.cluster_lock_dir.rmdir()


def test_update_rereads_the_file_under_the_lock(pve_root):
    # Another node holds the lock and writes; our waiting update must keep its entry.
    settings = pve_root.settings(lock_timeout=10)
    settings.cluster_lock_dir.mkdir()
    waiting = threading.Thread(target=update_spec, args=(settings, add(TAP)))
    waiting.start()
    time.sleep(0.3)
    pve_root.spec_file.write_text(format_spec(spec.ClusterSpec((NIC,))))
    settings.cluster_lock_dir.rmdir()
    waiting.join(timeout=10)
    assert load_spec(settings) == spec.ClusterSpec((NIC,), (TAP,))


def test_error_inside_the_change_releases_the_lock_and_writes_nothing(pve_root):
    settings = pve_root.settings(lock_timeout=0.5)
    update_spec(settings, add(NIC))
    before = pve_root.spec_file.read_bytes()

    def refuse(cluster):
        raise SpecError("refused", "fix it")

    with pytest.raises(SpecError, match="refused"):
        update_spec(settings, refuse)
    assert not settings.cluster_lock_dir.exists()
    assert pve_root.spec_file.read_bytes() == before
    update_spec(settings, add(TAP))  # the lock is free again


def test_malformed_file_is_refused_with_its_line_and_left_alone(pve_root):
    pve_root.spec_file.write_text("qinq: 100-net0\n\tqinq 9999\n")
    with pytest.raises(SpecError, match=r"pve-vhost-agent.cfg line 2: S-tag 9999"):
        update_spec(pve_root.settings(), add(NIC))
    assert pve_root.spec_file.read_text() == "qinq: 100-net0\n\tqinq 9999\n"
    assert not pve_root.settings().cluster_lock_dir.exists()
