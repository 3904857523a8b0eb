"""The declarations on /etc/pve: one file per VM, changed under the cluster lock, atomic,
only when needed; the single file of earlier versions is read and split by itself."""

import os
import threading
from dataclasses import replace as dataclass_replace
import time

import pytest

from pve_vhost_agent.adapters.specstore import load_spec, load_vm_spec, migrate_spec, update_spec
from pve_vhost_agent.errors import AgentTimeout, ExitCode, SpecError
from pve_vhost_agent.formats.specfile import format_spec
from pve_vhost_agent.model import spec

NIC = spec.VhostNic(100, 1, "br-dpdk", "02:00:00:00:01:01")
TAP = spec.TapQinQ(100, 0, spec.QinQ(200))
OTHER = spec.VhostNic(101, 1, "br-dpdk", "02:00:00:00:02:01")


def add(entry):
    return lambda cluster: cluster.with_entry(entry)


def test_missing_files_are_an_empty_spec(pve_root):
    assert load_spec(pve_root.settings()) == spec.ClusterSpec()
    assert load_vm_spec(pve_root.settings(), 100) == spec.VmSpec(100)


def test_each_vm_gets_its_own_file_and_the_lock_is_released(pve_root):
    settings = pve_root.settings()
    assert update_spec(settings, add(NIC)).changed
    assert pve_root.spec_file(100).read_text() == format_spec(spec.ClusterSpec((NIC,)))
    update_spec(settings, add(TAP))
    update_spec(settings, add(OTHER))
    assert load_spec(settings) == spec.ClusterSpec((NIC, OTHER), (TAP,))
    assert load_vm_spec(settings, 101) == spec.VmSpec(101, (OTHER,))
    assert not settings.cluster_lock_dir.exists()
    assert sorted(os.listdir(settings.spec_dir)) == ["100.cfg", "101.cfg"]
    update_spec(settings, lambda cluster: cluster.without(101, 1))
    assert sorted(os.listdir(settings.spec_dir)) == ["100.cfg"]  # a VM with nothing declared has no file


def test_a_change_writes_only_the_vms_it_changes(pve_root):
    settings = pve_root.settings()
    update_spec(settings, add(NIC))
    update_spec(settings, add(OTHER))
    inode = pve_root.spec_file(100).stat().st_ino
    update_spec(settings, add(dataclass_replace(OTHER, mtu=9000)))
    assert pve_root.spec_file(100).stat().st_ino == inode


def test_unchanged_spec_is_not_rewritten(pve_root):
    # A hand-formatted file that means the same spec stays as the user wrote it.
    text = "# edge routers\nqinq: 100-net0\n    qinq 200\n"
    pve_root.spec_file(100).parent.mkdir(parents=True)
    pve_root.spec_file(100).write_text(text)
    inode = pve_root.spec_file(100).stat().st_ino
    update = update_spec(pve_root.settings(), add(TAP))
    assert not update.changed
    assert pve_root.spec_file(100).read_text() == text
    assert pve_root.spec_file(100).stat().st_ino == inode


def test_a_vm_file_must_hold_only_its_own_vm(pve_root):
    pve_root.spec_file(100).parent.mkdir(parents=True)
    pve_root.spec_file(100).write_text(format_spec(spec.ClusterSpec((OTHER,))))
    with pytest.raises(SpecError, match=r"100.cfg declares NICs of VM 101; move them to .*/101.cfg"):
        load_spec(pve_root.settings())


def test_the_old_single_file_is_read_and_split_by_the_first_change(pve_root):
    settings = pve_root.settings()
    legacy = format_spec(spec.ClusterSpec((NIC, OTHER), (TAP,), (spec.ChainedHook(102, "local:snippets/a.pl"),)))
    pve_root.legacy_spec_file.write_text(legacy)
    assert load_vm_spec(settings, 100) == spec.VmSpec(100, (NIC,), (TAP,))  # read before any split
    assert load_spec(settings) == spec.ClusterSpec((NIC, OTHER), (TAP,), (spec.ChainedHook(102, "local:snippets/a.pl"),))
    nic2 = dataclass_replace(NIC, index=2, mac="02:00:00:00:01:02")
    update_spec(settings, add(nic2))
    assert not pve_root.legacy_spec_file.exists()
    assert sorted(os.listdir(settings.spec_dir)) == ["100.cfg", "101.cfg", "102.cfg"]
    assert load_spec(settings) == spec.ClusterSpec((NIC, nic2, OTHER), (TAP,),
                                                   (spec.ChainedHook(102, "local:snippets/a.pl"),))


def test_a_split_cut_short_loses_nothing_and_migrate_finishes_it(pve_root):
    settings = pve_root.settings()
    pve_root.legacy_spec_file.write_text(format_spec(spec.ClusterSpec((NIC, OTHER))))
    # A VM file written already (the split stopped after it): it wins for its VM.
    settings.spec_dir.mkdir()
    pve_root.spec_file(100).write_text(format_spec(spec.ClusterSpec((dataclass_replace(NIC, mtu=1500),))))
    assert load_spec(settings) == spec.ClusterSpec((dataclass_replace(NIC, mtu=1500), OTHER))
    assert migrate_spec(settings) == 1 and migrate_spec(settings) == 0
    assert not pve_root.legacy_spec_file.exists()
    assert load_spec(settings) == spec.ClusterSpec((dataclass_replace(NIC, mtu=1500), OTHER))


def test_held_cluster_lock_times_out_and_is_left_to_its_holder(pve_root):
    settings = pve_root.settings(lock_timeout=0.5)
    update_spec(settings, add(NIC))
    before = pve_root.spec_file(100).read_bytes()
    settings.cluster_lock_dir.mkdir()  # another node holds the lock
    started = time.monotonic()
    with pytest.raises(AgentTimeout) as caught:
        update_spec(settings, add(TAP))
    waited = time.monotonic() - started
    assert 0.5 <= waited < 2.5
    message = str(caught.value)
    assert str(settings.cluster_lock_dir) in message and "120 s" in message
    assert caught.value.exit_code == ExitCode.TIMEOUT
    assert pve_root.spec_file(100).read_bytes() == before
    assert settings.cluster_lock_dir.is_dir()  # never break someone else's lock
    settings.cluster_lock_dir.rmdir()


def test_update_rereads_the_files_under_the_lock(pve_root):
    # Another node holds the lock and writes; our waiting update must keep its entry.
    settings = pve_root.settings(lock_timeout=10)
    settings.cluster_lock_dir.mkdir()
    waiting = threading.Thread(target=update_spec, args=(settings, add(TAP)))
    waiting.start()
    time.sleep(0.3)
    settings.spec_dir.mkdir()
    pve_root.spec_file(100).write_text(format_spec(spec.ClusterSpec((NIC,))))
    settings.cluster_lock_dir.rmdir()
    waiting.join(timeout=10)
    assert load_spec(settings) == spec.ClusterSpec((NIC,), (TAP,))


def test_error_inside_the_change_releases_the_lock_and_writes_nothing(pve_root):
    settings = pve_root.settings(lock_timeout=0.5)
    update_spec(settings, add(NIC))
    before = pve_root.spec_file(100).read_bytes()

    def refuse(cluster):
        raise SpecError("refused", "fix it")

    with pytest.raises(SpecError, match="refused"):
        update_spec(settings, refuse)
    assert not settings.cluster_lock_dir.exists()
    assert pve_root.spec_file(100).read_bytes() == before
    update_spec(settings, add(TAP))  # the lock is free again


def test_malformed_file_is_refused_with_its_line_and_left_alone(pve_root):
    pve_root.spec_file(100).parent.mkdir(parents=True)
    pve_root.spec_file(100).write_text("qinq: 100-net0\n\tqinq 9999\n")
    with pytest.raises(SpecError, match=r"100.cfg line 2: S-tag 9999"):
        update_spec(pve_root.settings(), add(NIC))
    assert pve_root.spec_file(100).read_text() == "qinq: 100-net0\n\tqinq 9999\n"
    assert not pve_root.settings().cluster_lock_dir.exists()


def test_a_hook_reads_only_its_vms_file(pve_root):
    """Cost independent of the cluster: another VM's broken file does not even get read."""
    settings = pve_root.settings()
    update_spec(settings, add(NIC))
    pve_root.spec_file(101).write_text("this is not a spec\n")
    assert load_vm_spec(settings, 100) == spec.VmSpec(100, (NIC,))
    with pytest.raises(SpecError, match="101.cfg line 1"):
        load_spec(settings)
