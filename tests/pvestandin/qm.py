"""VM start, stop, crash and live migration as qemu-server 9.2 runs them, hooks included.

start (`vm_start` / `vm_start_nolock`), under the VM config lock:
  load the config (the source node's folder during a migration start) -> apply [PENDING]
  and write it back (not for a migration start, nor a resume: `vmstate`/`lock: suspended`) -> pre-start (non-zero: abort, no QEMU)
  -> build the command line -> run QEMU (its pve-bridge plugs the taps) -> cleanup flag
  -> post-start. A failed QEMU start runs no hook.
stop (`vm_stop`): pre-stop -> QMP quit, wait for the PID to end -> cleanup (remove run
  files, apply [PENDING]) -> post-stop (once per QEMU run: the cleanup flag).
guest shutdown / crash (qmeventd -> `qm cleanup`): no pre-stop; after a crash the taps are
  unplugged first; then cleanup -> post-stop.
migrate (`QemuMigrate`), under the source's VM lock with `lock: migrate` in the config:
  the target starts with PVE_MIGRATED_FROM=<source> and `-incoming` while the config is
  still in the source's folder (pre-start, post-start run there); QMP migrate; the config
  moves to the target's folder; the source QEMU ends with no hook at all; the target
  clears the lock.

Test-machine-only additions (not what Proxmox does): TCG (`accel=tcg`, as Proxmox does for
`kvm: 0`), `-display none` instead of VNC, and `-global virtio-net-pci.vectors=0` (QEMU 7.2
under TCG crashes when a guest starts a vhost-user NIC with MSI-X). They come before the
`args:` line, which stays last. `-S` (paused) is added unless the Qm is told otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator, Mapping

from pvestandin import cmdline, qemu, vmconfig
from pvestandin.hooks import HookError, TaskLog, exec_hookscript, run_command_env, start_environment
from pvestandin.layout import Cluster, Node

TEST_MACHINE_ARGS = ("-display", "none", "-global", "virtio-net-pci.vectors=0")
TEST_MACHINE_MACHINE_FLAGS = ("accel=tcg",)
LOCK_TIMEOUT = 10.0  # Proxmox waits 10 s for a VM config lock
RUN_FILES = ("mon", "qmp", "pid", "vnc", "qga")


class StandinError(Exception):
    """A Proxmox operation failed; `task` holds the task log up to the failure."""

    def __init__(self, message: str, task: TaskLog):
        super().__init__(message)
        self.task = task


class StartAborted(StandinError):
    """pre-start failed (or its hookscript could not be run): no QEMU was started."""


class StartFailed(StandinError):
    """The start failed after pre-start (config refused, QEMU failed or timed out)."""


class MigrationFailed(StandinError):
    pass


@dataclasses.dataclass(frozen=True)
class RunningVm:
    vmid: int
    node: str
    pid: int
    qmp: Path
    argv: tuple[str, ...]
    task: TaskLog


@functools.lru_cache(maxsize=None)
def installed_qemu_version(binary: str) -> str:
    """`kvm_user_version`: "7.2.22" from `<binary> --version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"version (\d+\.\d+(?:\.\d+)?)", out).group(1)


def has_vhost_net() -> bool:
    try:
        return stat.S_ISCHR(os.stat("/dev/vhost-net").st_mode)
    except FileNotFoundError:
        return False


class Qm:
    """qemu-server on one node of a stand-in cluster."""

    def __init__(self, cluster: Cluster, node: str, *, paused: bool = True, start_timeout: float = 30.0,
                 hook_timeout: float | None = None, env: Mapping[str, str] | None = None,
                 binary: str = "qemu-system-x86_64"):
        self.cluster = cluster
        self.node: Node = cluster.nodes[node]
        self.paused = paused
        self.start_timeout = start_timeout
        self.hook_timeout = hook_timeout
        self.env = dict(os.environ if env is None else env)
        self.binary = binary

    # --- host facts and paths -------------------------------------------------------

    def bridge_mtu(self, bridge: str) -> int:
        netns = ["-netns", self.node.netns] if self.node.netns else []
        result = subprocess.run(["ip", *netns, "-json", "link", "show", "dev", bridge],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise cmdline.ConfigError(f"bridge '{bridge}' does not exist")
        return int(json.loads(result.stdout)[0]["mtu"])

    def facts(self) -> cmdline.HostFacts:
        sizes = tuple(int(p.name.split("-")[1].removesuffix("kB")) // 1024
                      for p in Path("/sys/kernel/mm/hugepages").glob("hugepages-*kB"))
        return cmdline.HostFacts(installed_qemu_version(self.binary), has_vhost_net(), self.bridge_mtu,
                                 self.node.root, sizes)

    def run_file(self, vmid: int, ext: str) -> Path:
        return self.node.path(f"/var/run/qemu-server/{vmid}.{ext}")

    def cleanup_flag(self, vmid: int) -> Path:
        return self.node.path(f"/run/qemu-server/{vmid}.cleanup")

    def pid(self, vmid: int) -> int | None:
        """`check_running`: the PID from the pidfile, if that process still runs."""
        pid = qemu.read_pid(self.run_file(vmid, "pid"))
        return pid if pid is not None and qemu.is_alive(pid) else None

    @contextlib.contextmanager
    def lock(self, vmid: int, task: TaskLog) -> Iterator[None]:
        """`lock_config`: exclusive flock on /var/lock/qemu-server/lock-<vmid>.conf."""
        path = self.node.path(f"/var/lock/qemu-server/lock-{vmid}.conf")
        with open(path, "a") as handle:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StandinError(f"can't lock file '{path}' - got timeout", task) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self, vmid: int, node: str | None = None, task: TaskLog | None = None) -> vmconfig.VmConfig:
        path = self.node.vm_conf(vmid, node)
        if not path.exists():
            raise StandinError(
                f"Configuration file 'nodes/{node or self.node.name}/qemu-server/{vmid}.conf' does not exist",
                task or TaskLog(),
            )
        return vmconfig.load(path)

    def showcmd(self, vmid: int) -> cmdline.Command:
        """`qm showcmd`: the command line a start would run (no hooks, pending not applied)."""
        return cmdline.config_to_command(vmid, self.load(vmid).main, self.facts(), self.binary,
                                         TEST_MACHINE_MACHINE_FLAGS)

    def _hook(self, conf: Mapping[str, str], vmid: int, phase: str, env: Mapping[str, str], task: TaskLog,
              stop_on_error: bool = False) -> None:
        exec_hookscript(root=self.node.root, conf=conf, vmid=vmid, phase=phase, env=env, task=task,
                        stop_on_error=stop_on_error, enter=self.node.enter(), timeout=self.hook_timeout)

    # --- start ------------------------------------------------------------------------

    def start(self, vmid: int, *, migrated_from: str | None = None, incoming: str | None = None) -> RunningVm:
        task = TaskLog()
        with self.lock(vmid, task):
            conf = self.load(vmid, migrated_from, task)
            if self.pid(vmid):
                raise StartFailed(f"VM {vmid} already running", task)
            # No pending changes for a migration target nor a resume from hibernation.
            resume = conf.main.get("lock") == "suspended" or "vmstate" in conf.main
            if incoming is None and not resume and conf.has_pending():
                conf.apply_pending()
                vmconfig.write(self.node.vm_conf(vmid), conf)
            env = start_environment(self.env, migrated_from)
            try:
                self._hook(conf.main, vmid, "pre-start", env, task, stop_on_error=True)
            except HookError as err:
                raise StartAborted(str(err), task) from err
            argv = self._argv(vmid, conf.main, incoming, task)
            pidfile = self.run_file(vmid, "pid")
            try:
                result = qemu.launch(self.node.enter() + argv, run_command_env(env), pidfile, self.start_timeout)
            except subprocess.TimeoutExpired as err:
                task.add(err.output or "")
                raise StartFailed(f"start failed: QEMU did not start within {self.start_timeout} s", task) from err
            task.add(result.stdout)
            if result.returncode != 0:
                raise StartFailed(f"start failed: QEMU exited with code {result.returncode}", task)
            pid = qemu.read_pid(pidfile)
            self.cleanup_flag(vmid).write_text(str(int(time.time())))
            self._hook(conf.main, vmid, "post-start", env, task)
        return RunningVm(vmid, self.node.name, pid, self.run_file(vmid, "qmp"), tuple(argv), task)

    def _argv(self, vmid: int, conf: Mapping[str, str], incoming: str | None, task: TaskLog) -> list[str]:
        try:
            command = cmdline.config_to_command(vmid, conf, self.facts(), self.binary, TEST_MACHINE_MACHINE_FLAGS)
        except cmdline.ConfigError as err:
            raise StartFailed(str(err), task) from err
        for ext in ("pid", "qmp"):
            self.run_file(vmid, ext).unlink(missing_ok=True)
        if conf.get("hugepages"):
            self._hugepages_mount()
        state = ["-incoming", incoming] if incoming else (["-S"] if self.paused else [])
        return [*command.generated, *TEST_MACHINE_ARGS, *command.args, *state]

    def _hugepages_mount(self) -> None:
        """`hugepages_mount` mounts hugetlbfs at /run/hugepages/kvm/<size>kB. Test substitute:
        a plain folder, unless the test mounted a hugetlbfs there itself; QEMU then backs guest
        memory with a shared file (share=on holds, the page size is not a huge one)."""
        for size in self.facts().hugepage_sizes_mib:
            self.node.path(cmdline.hugepages_mount_path(size)).mkdir(parents=True, exist_ok=True)

    # --- stop, guest shutdown, crash ---------------------------------------------------

    def stop(self, vmid: int, timeout: float = 60.0) -> TaskLog:
        """`qm stop`: pre-stop, QMP quit, then the cleanup path (post-stop)."""
        task = TaskLog()
        with self.lock(vmid, task):
            pid = self.pid(vmid)
            if pid is None:
                return task
            conf = self.load(vmid, task=task)
            self._hook(conf.main, vmid, "pre-stop", self.env, task)
            self._end(vmid, pid, timeout)
            self._cleanup(vmid, conf, task, apply_pending=True)
        return task

    def shutdown_from_guest(self, vmid: int) -> TaskLog:
        """The guest powers off: QEMU quits by itself; no pre-stop; qmeventd's cleanup."""
        pid = self._running(vmid)
        qemu.qmp_command(self.run_file(vmid, "qmp"), "quit")
        if not qemu.wait_gone(pid, 30):
            raise TimeoutError(f"QEMU {pid} did not quit")
        return self.qm_cleanup(vmid, clean=True)

    def crash(self, vmid: int) -> TaskLog:
        """QEMU dies (SIGKILL): no pre-stop, no downscript; qmeventd's cleanup unplugs taps."""
        qemu.kill(self._running(vmid))
        return self.qm_cleanup(vmid, clean=False)

    def _running(self, vmid: int) -> int:
        pid = self.pid(vmid)
        if pid is None:
            raise StandinError(f"VM {vmid} is not running", TaskLog())
        return pid

    def qm_cleanup(self, vmid: int, *, clean: bool) -> TaskLog:
        """`qm cleanup` as qmeventd runs it once QEMU has gone."""
        task = TaskLog()
        with self.lock(vmid, task):
            conf = self.load(vmid, task=task)
            if not clean:  # the taps of a crashed QEMU are still plugged
                for key in conf.main:
                    match = re.match(r"^net(\d+)$", key)
                    if match:
                        self._bridge_script("pve-bridgedown", f"tap{vmid}i{match.group(1)}", task)
            self._cleanup(vmid, conf, task, apply_pending=False)
        return task

    def _bridge_script(self, name: str, iface: str, task: TaskLog) -> None:
        script = self.node.path(f"/usr/libexec/qemu-server/{name}")
        result = subprocess.run([*self.node.enter(), str(script), iface], capture_output=True, text=True)
        task.add(result.stdout + result.stderr)

    def _end(self, vmid: int, pid: int, timeout: float) -> None:
        with contextlib.suppress(OSError, qemu.QmpError):
            qemu.qmp_command(self.run_file(vmid, "qmp"), "quit")
        if not qemu.wait_gone(pid, timeout):
            qemu.kill(pid)

    def _cleanup(self, vmid: int, conf: vmconfig.VmConfig, task: TaskLog, *, apply_pending: bool,
                 skip_hook: bool = False) -> None:
        """`vm_stop_cleanup`: only once per QEMU run (the cleanup flag), post-stop last."""
        flag = self.cleanup_flag(vmid)
        if not flag.exists():
            return
        for ext in RUN_FILES:
            self.run_file(vmid, ext).unlink(missing_ok=True)
        if apply_pending and conf.has_pending():
            conf.apply_pending()
            vmconfig.write(self.node.vm_conf(vmid), conf)
        if not skip_hook:
            self._hook(conf.main, vmid, "post-stop", self.env, task)
        flag.unlink(missing_ok=True)


# --- live migration ---------------------------------------------------------------------


def migrate(source: Qm, target: Qm, vmid: int, timeout: float = 60.0) -> RunningVm:
    """Live-migrate running VM `vmid` from `source`'s node to `target`'s node.

    As `AbstractMigrate::migrate` runs `QemuMigrate`: all of it under the source's VM lock;
    phase1 writes `lock: migrate` into the config; phase2 starts the target (`qm start
    --skiplock --migratedfrom`, hooks there) and migrates; phase3_cleanup moves the config,
    ends the source's QEMU with no hook and clears the lock on the target (`qm unlock`). A
    failure before the move ends the target's QEMU (if any) and removes the lock again
    (phase2_cleanup, phase1_cleanup): the VM goes on running on the source.
    """
    task = TaskLog()
    with source.lock(vmid, task):
        pid = source.pid(vmid)
        if pid is None:
            raise MigrationFailed(f"VM {vmid} is not running on {source.node.name}", task)
        _set_lock(source.node.vm_conf(vmid), "migrate")
        try:
            running = _phase2(source, target, vmid, timeout, task)
        except MigrationFailed:
            _set_lock(source.node.vm_conf(vmid), None)
            raise
        old = source.node.vm_conf(vmid)
        oldconf = vmconfig.load(old)
        os.replace(old, target.node.vm_conf(vmid))
        if running.was_running:
            qemu.qmp_command(running.vm.qmp, "cont")
        # The source's QEMU ends with neither pre-stop nor post-stop.
        source._end(vmid, pid, timeout)
        source._cleanup(vmid, oldconf, task, apply_pending=False, skip_hook=True)
        with target.lock(vmid, task):  # `qm unlock` on the target
            _set_lock(target.node.vm_conf(vmid), None)
    return dataclasses.replace(running.vm, task=task)


@dataclasses.dataclass(frozen=True)
class _Migrated:
    vm: RunningVm
    was_running: bool


def _phase2(source: Qm, target: Qm, vmid: int, timeout: float, task: TaskLog) -> _Migrated:
    """Start the target with -incoming and migrate into it; the target paused until `cont`."""
    uri = f"unix:{target.run_file(vmid, 'migrate')}"
    try:
        running = target.start(vmid, migrated_from=source.node.name, incoming=uri)
    except StandinError as err:
        task.lines += err.task.lines
        task.hooks += err.task.hooks
        raise MigrationFailed(f"migration aborted: target start failed: {err}", task) from err
    task.lines += running.task.lines
    task.hooks += running.task.hooks
    # The source reads the target's output for this line to learn where to migrate to.
    bogus = [line for line in running.task.lines if line.startswith("migration listens on")]
    if bogus:
        target._end(vmid, running.pid, 10)
        raise MigrationFailed(f"source parsed a stray line as the migration address: {bogus[0]!r}", task)
    source_qmp = source.run_file(vmid, "qmp")
    was_running = qemu.qmp_command(source_qmp, "query-status")["status"] == "running"
    qemu.qmp_command(source_qmp, "migrate", uri=uri)
    deadline = time.monotonic() + timeout
    while (status := qemu.qmp_command(source_qmp, "query-migrate").get("status")) != "completed":
        if status == "failed" or time.monotonic() > deadline:
            target._end(vmid, running.pid, 10)
            raise MigrationFailed(f"migration failed: status {status}", task)
        time.sleep(0.05)
    return _Migrated(running, was_running)


def _set_lock(path: Path, lock: str | None) -> None:
    """`lock:` in a VM config (`set_lock` / `remove_lock`)."""
    conf = vmconfig.load(path)
    if lock is None:
        conf.main.pop("lock", None)
    else:
        conf.main["lock"] = lock
    vmconfig.write(path, conf)


def kill_leftovers(cluster: Cluster) -> list[int]:
    """Kill every QEMU still running from a pidfile of the cluster's nodes (test teardown)."""
    killed = []
    for node in cluster.nodes.values():
        for pidfile in node.path("/run/qemu-server").glob("*.pid"):
            pid = qemu.read_pid(pidfile)
            if pid is not None and qemu.is_alive(pid):
                qemu.kill(pid)
                killed.append(pid)
    return killed
