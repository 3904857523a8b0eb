"""VM configs across the cluster: finding them, running state, and locked atomic writes."""

import os
import subprocess
import sys
import time

import pytest

from pve_vhost_agent.errors import AgentTimeout, ClusterReadOnly, ConfigConflict, ExitCode, NotFound, SpecError
from pve_vhost_agent.adapters.vmstore import find_vm, update_vm_config, vm_busy, vm_running

from fixtures.fakeqemu import start_fake_qemu
from conftest import PEER, REPO

CONFIG = (PEER / "qemu-server-cfg2cmd" / "netdev.conf").read_text()
ARGS = "-chardev socket,id=c0,path=/run/vm-100-1.sock,server=on,wait=off"


def set_args(config):
    return config.with_value("args", ARGS)


def hold_flock(path, seconds=60):
    """Another process that holds an exclusive flock on `path` until killed."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(float(sys.argv[2]))")
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def stop(proc):
    proc.kill()
    proc.wait()


def test_find_vm_on_this_node_and_on_another(pve_root):
    pve_root.write_vm(100, CONFIG)
    pve_root.write_vm(200, CONFIG, node="pve2")
    settings = pve_root.settings()
    here = find_vm(settings, 100)
    assert (here.node, here.local, here.running) == ("pve1", True, False)
    assert here.config.text == CONFIG
    there = find_vm(settings, 200)
    assert (there.node, there.local, there.running) == ("pve2", False, None)
    assert there.path == pve_root.vm_path(200, "pve2")


def test_unknown_vm_is_not_found_with_a_hint(pve_root):
    with pytest.raises(NotFound) as caught:
        find_vm(pve_root.settings(), 123)
    assert "VM 123 does not exist" in str(caught.value) and "qm list" in str(caught.value)
    assert caught.value.exit_code == ExitCode.NOT_FOUND


def test_running_means_a_live_process_in_the_pidfile(pve_root):
    settings = pve_root.settings()
    pidfile = settings.qemu_pidfile(100)
    pidfile.parent.mkdir(parents=True)
    assert not vm_running(settings, 100)  # no pidfile
    pidfile.write_text("not a pid\n")
    assert not vm_running(settings, 100)
    other = subprocess.Popen(["sleep", "60"])  # alive, but not started with this pidfile
    try:
        pidfile.write_text(f"{other.pid}\n")
        assert not vm_running(settings, 100)  # a reused PID is not the VM (Proxmox checks too)
    finally:
        other.kill()
        other.wait()
    proc = start_fake_qemu(pidfile)
    try:
        assert vm_running(settings, 100)
        proc.kill()
        # Not reaped yet: a zombie is not a running VM.
        deadline = time.monotonic() + 5
        while vm_running(settings, 100) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not vm_running(settings, 100)
    finally:
        proc.kill()
        proc.wait()
    assert not vm_running(settings, 100)


def test_update_changes_only_the_args_line_and_writes_nothing_when_unchanged(pve_root):
    path = pve_root.write_vm(100, CONFIG)
    settings = pve_root.settings()
    update = update_vm_config(settings, 100, set_args)
    assert update.changed
    assert path.read_text() == CONFIG.replace("bootdisk:", f"args: {ARGS}\nbootdisk:")
    inode = path.stat().st_ino
    again = update_vm_config(settings, 100, set_args)
    assert not again.changed
    assert path.stat().st_ino == inode  # not even rewritten
    update_vm_config(settings, 100, lambda c: c.with_value("args", None))
    assert path.read_text() == CONFIG
    assert sorted(os.listdir(path.parent)) == ["100.conf"]  # no temp file left


def test_update_refuses_a_vm_of_another_node(pve_root):
    path = pve_root.write_vm(100, CONFIG, node="pve2")
    with pytest.raises(ConfigConflict) as caught:
        update_vm_config(pve_root.settings(), 100, set_args)
    assert str(caught.value) == "VM 100 lives on node pve2; run this on pve2"
    assert path.read_text() == CONFIG


def test_update_refuses_a_vm_proxmox_has_locked(pve_root):
    path = pve_root.write_vm(100, CONFIG + "lock: backup\n")
    with pytest.raises(ConfigConflict, match=r"locked by Proxmox \(backup\).*qm unlock 100"):
        update_vm_config(pve_root.settings(), 100, set_args)
    assert path.read_text() == CONFIG + "lock: backup\n"


def test_update_waits_for_the_vm_lock_and_times_out_within_the_bound(pve_root):
    path = pve_root.write_vm(100, CONFIG)
    settings = pve_root.settings(lock_timeout=0.5)
    holder = hold_flock(settings.vm_lock(100))
    try:
        started = time.monotonic()
        with pytest.raises(AgentTimeout) as caught:
            update_vm_config(settings, 100, set_args)
        waited = time.monotonic() - started
    finally:
        stop(holder)
    assert 0.5 <= waited < 3
    assert str(settings.vm_lock(100)) in str(caught.value)
    assert caught.value.exit_code == ExitCode.TIMEOUT
    assert path.read_text() == CONFIG


def test_update_proceeds_once_the_lock_is_released(pve_root):
    path = pve_root.write_vm(100, CONFIG)
    settings = pve_root.settings(lock_timeout=10)
    holder = hold_flock(settings.vm_lock(100), seconds=0.5)
    try:
        started = time.monotonic()
        update_vm_config(settings, 100, set_args)
        assert time.monotonic() - started >= 0.3
    finally:
        stop(holder)
    assert f"args: {ARGS}\n" in path.read_text()


def test_update_rereads_the_config_under_the_lock(pve_root):
    # Proxmox changes the config while we wait for its lock: our change applies on top.
    path = pve_root.write_vm(100, CONFIG)
    settings = pve_root.settings(lock_timeout=10)
    holder = hold_flock(settings.vm_lock(100), seconds=0.5)
    try:
        path.write_text(CONFIG.replace("memory: 768", "memory: 1024"))
        update_vm_config(settings, 100, set_args)
    finally:
        stop(holder)
    assert "memory: 1024\n" in path.read_text() and f"args: {ARGS}\n" in path.read_text()


def test_error_inside_the_change_releases_the_lock_and_writes_nothing(pve_root):
    path = pve_root.write_vm(100, CONFIG)
    settings = pve_root.settings(lock_timeout=0.5)

    def refuse(config):
        raise SpecError("no", "fix")

    with pytest.raises(SpecError):
        update_vm_config(settings, 100, refuse)
    update_vm_config(settings, 100, set_args)  # would time out if the lock were still held
    assert f"args: {ARGS}\n" in path.read_text()
    assert sorted(os.listdir(path.parent)) == ["100.conf"]


def test_read_only_etc_pve_is_reported_as_no_quorum(pve_root):
    path = pve_root.write_vm(100, CONFIG)
    code = ("import sys; from pathlib import Path; from pve_vhost_agent.settings import Settings; "
            "from pve_vhost_agent.adapters.vmstore import update_vm_config; from pve_vhost_agent.errors import AgentError\n"
            "try:\n"
            "    update_vm_config(Settings(root=Path(sys.argv[1]), node='pve1'), 100, "
            "lambda c: c.with_value('args', '-x'))\n"
            "except AgentError as err:\n"
            "    print(type(err).__name__, err); sys.exit(int(err.exit_code))\n")
    result = subprocess.run(pve_root.read_only([sys.executable, "-c", code, str(pve_root.root)]),
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == ExitCode.REFUSED, result.stderr
    assert result.stdout.startswith(f"{ClusterReadOnly.__name__} /etc/pve is read-only: this node has no quorum")
    assert path.read_text() == CONFIG
    assert sorted(os.listdir(path.parent)) == ["100.conf"]


def test_bytes_that_are_not_utf8_survive_a_write(pve_root):
    # An old description in Latin-1: Proxmox keeps the bytes, and so must we.
    raw = b"#caf\xe9 router\nmemory: 512\nname: cafe\n"
    path = pve_root.vm_path(100)
    path.write_bytes(raw)
    update_vm_config(pve_root.settings(), 100, set_args)
    assert path.read_bytes() == f"#caf\xe9 router\nargs: {ARGS}\nmemory: 512\nname: cafe\n".encode("latin-1")
    update_vm_config(pve_root.settings(), 100, lambda c: c.with_value("args", None))
    assert path.read_bytes() == raw


def test_busy_means_someone_holds_the_vm_lock_and_the_probe_takes_none(pve_root):
    settings = pve_root.settings()
    lock = settings.vm_lock(100)
    assert not vm_busy(settings, 100) and not lock.exists()  # probing creates no lock file
    holder = hold_flock(lock)
    try:
        assert vm_busy(settings, 100)
        assert not vm_busy(settings, 101)
    finally:
        stop(holder)
    assert not vm_busy(settings, 100)
    # The probe never holds the lock itself, not even for a moment: a flock taken right
    # after each probe succeeds without waiting.
    import fcntl
    with open(lock, "a") as handle:
        for _ in range(50):
            assert not vm_busy(settings, 100)
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert vm_busy(settings, 100)  # our own lock shows up too
            fcntl.flock(handle, fcntl.LOCK_UN)


def test_busy_skips_lines_of_proc_locks_it_cannot_read(pve_root, tmp_path):
    settings = pve_root.settings()
    lock = settings.vm_lock(100)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    st = lock.stat()
    ours = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    locks = tmp_path / "locks"
    garbage = ["1: FLOCK  ADVISORY  WRITE 1234 fd:01 0 EOF", "2: FLOCK  ADVISORY  WRITE 1234 zz:01:x 0 EOF",
               "3: FLOCK  ADVISORY  WRITE 1234 fd:01:5:6 0 EOF", "4: FLOCK"]
    locks.write_text("\n".join(garbage) + "\n")
    assert not vm_busy(settings, 100, locks)
    locks.write_text("\n".join(garbage + [f"5: FLOCK  ADVISORY  WRITE 1234 {ours} 0 EOF"]) + "\n")
    assert vm_busy(settings, 100, locks)
