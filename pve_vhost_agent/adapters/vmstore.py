"""Finding, reading and changing Proxmox VM configs across the cluster (an edge).

A VM's config lives at /etc/pve/nodes/<node>/qemu-server/<vmid>.conf on every node
(pmxcfs replicates it); only the node that owns the VM may change it, under Proxmox's
per-VM lock: an exclusive flock on /var/lock/qemu-server/lock-<vmid>.conf, the same lock
`qm set` and `qm start` take, so the agent never writes between their read and write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping

from pve_vhost_agent.adapters import pvefs
from pve_vhost_agent.adapters.filelock import flocked
from pve_vhost_agent.errors import AgentError, ConfigConflict, NotFound, VmBusy, VmChanged
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.model.spec import is_decimal

@dataclasses.dataclass(frozen=True)
class VmLocation:
    """Where a VM's config lives and what it says right now."""

    vmid: int
    node: str
    path: Path
    config: VmConfig
    local: bool  # the VM belongs to this node
    running: bool | None  # None: it lives on another node, whose processes we cannot see


@dataclasses.dataclass(frozen=True)
class VmUpdate:
    """The result of update_vm_config: the config before and after (equal: nothing written)."""

    location: VmLocation
    after: VmConfig

    @property
    def changed(self) -> bool:
        return self.after.text != self.location.config.text


def find_vm(settings: Settings, vmid: int) -> VmLocation:
    """The VM's config, on whichever node it lives; NotFound if no node has it."""
    # A migration moves the file between node folders: look again if it vanished.
    for _attempt in range(3):
        paths = sorted(settings.nodes_dir().glob(f"*/qemu-server/{vmid}.conf"))
        if not paths:
            pvefs.require_mounted(settings.pve_dir)  # an unmounted /etc/pve hides every VM
            raise NotFound(
                f"VM {vmid} does not exist: no node has qemu-server/{vmid}.conf under {settings.nodes_dir()}",
                "check the VM id with `qm list` (or `pvesh get /cluster/resources --type vm`)",
            )
        if len(paths) > 1:
            nodes = ", ".join(p.parent.parent.name for p in paths)
            raise ConfigConflict(f"VM {vmid} has a config on several nodes ({nodes})",
                                 "remove the stale copy; Proxmox allows one owner per VM id")
        text = pvefs.read_text(paths[0])
        if text is not None:
            node = paths[0].parent.parent.name
            local = node == settings.node
            return VmLocation(vmid, node, paths[0], VmConfig.parse(text), local,
                              vm_running(settings, vmid) if local else None)
    raise AgentError(f"the config of VM {vmid} keeps moving between nodes", "wait for its migration to end, then retry")


def vm_node(settings: Settings, vmid: int) -> str | None:
    """The node whose folder holds VM `vmid`'s config (where it runs or would start), or
    None when no node has it (or several do)."""
    paths = list(settings.nodes_dir().glob(f"*/qemu-server/{vmid}.conf"))
    return paths[0].parent.parent.name if len(paths) == 1 else None


def local_vm_configs(settings: Settings, files: pvefs.ParsedFiles | None = None) -> list[tuple[int, VmConfig | AgentError]]:
    """This node's VM configs by id, in id order; an unreadable one as its error (one bad
    file must not hide the others). A config that vanished meanwhile (migrated) is left out.
    `files` keeps the parsed configs that did not change since the last call."""
    files = files or pvefs.ParsedFiles()
    found: list[tuple[int, VmConfig | AgentError]] = []
    paths = [p for p in settings.vm_conf(0).parent.glob("*.conf") if is_decimal(p.stem)]
    for path in paths:
        try:
            config = files.get(path, VmConfig.parse)
        except AgentError as err:
            found.append((int(path.stem), err))
            continue
        if config is not None:
            found.append((int(path.stem), config))
    return sorted(found, key=lambda item: item[0])


def vm_running(settings: Settings, vmid: int) -> bool:
    """True when this node's QEMU pidfile of the VM names a live (not zombie) process that
    was started with that pidfile, as Proxmox checks it: a reused PID is not the VM."""
    pidfile = settings.qemu_pidfile(vmid)
    try:
        pid = int(pidfile.read_text().strip())
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return False
    if fields[0] == "Z":
        return False
    return any(arg == b"-pidfile" and _same_file(os.fsdecode(value), pidfile)
               for arg, value in zip(argv, argv[1:]))


def _same_file(one: str, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def update_vm_config(settings: Settings, vmid: int, change: Callable[[VmConfig], VmConfig]) -> VmUpdate:
    """Apply `change` to the VM's config under Proxmox's VM lock; write only if it changed."""
    _must_be_local(find_vm(settings, vmid))
    with vm_lock(settings, vmid):
        location = find_vm(settings, vmid)  # again: someone may have changed it meanwhile
        check_writable(location)
        # Proxmox's writers of this config (`qm set`) hold this lock too.
        pvefs.remove_stale_temp_files(location.path.parent, location.path.name)
        after = change(location.config)
        update = VmUpdate(location, after)
        if update.changed:
            pvefs.write_atomic(location.path, after.text)
        return update


def check_writable(location: VmLocation, after: VmConfig | None = None) -> None:
    """What a write of the VM's config needs, checked before anything is written: the VM
    lives here, Proxmox has not locked it (`lock:`), and `after` fits pmxcfs."""
    _must_be_local(location)
    _must_be_unlocked(location)
    if after is not None and after.text != location.config.text:
        pvefs.check_size(location.path, after.text)


def _must_be_local(location: VmLocation) -> None:
    if not location.local:
        raise ConfigConflict(f"VM {location.vmid} lives on node {location.node}",
                             f"run this on {location.node}")


def _must_be_unlocked(location: VmLocation) -> None:
    # Like `qm set`: a `lock:` key means a backup, migration or snapshot is under way.
    lock = location.config.section().get("lock")
    if lock:
        raise ConfigConflict(f"VM {location.vmid} is locked by Proxmox ({lock})",
                             f"retry when that task has finished, or clear a stale lock with `qm unlock {location.vmid}`")


@contextlib.contextmanager
def vm_lock(settings: Settings, vmid: int) -> Iterator[None]:
    """Hold Proxmox's lock of VM `vmid` (flock), waiting at most settings.lock_timeout."""
    path = settings.vm_lock(vmid)

    def busy() -> VmBusy:
        return VmBusy(f"VM {vmid} is locked by another task (lock file {path}, waited {settings.lock_timeout:g} s)",
                      "retry when the running `qm` task or VM start has finished")

    with flocked(path, settings.lock_timeout, busy, "VM lock file"):
        yield


@contextlib.contextmanager
def vm_guard(settings: Settings, vmid: int, running: bool) -> Iterator[None]:
    """Proxmox's VM lock, held only while the VM still runs (`running`) or still does not.

    Raises VmBusy when the lock is not free within settings.lock_timeout, VmChanged when
    the VM started or stopped since it was planned for.
    """
    with vm_lock(settings, vmid):
        if vm_running(settings, vmid) != running:
            now = "runs" if not running else "no longer runs"
            raise VmChanged(f"VM {vmid} {now}: it started or stopped meanwhile",
                            "nothing was changed; the next pass (or the command run again) plans anew")
        yield


def vm_guards(settings: Settings, expected: Mapping[int, bool]):
    """A guard for `Ovsdb.apply`: for each VM of a step that `expected` names, Proxmox's VM
    lock (waiting at most settings.lock_timeout: 0 for the service), held only while the VM
    still runs (True) or still does not (False). It yields (the VMs that may go in,
    {vmid: why not} for the others)."""

    @contextlib.contextmanager
    def guard(vmids: frozenset[int]) -> Iterator[tuple[frozenset[int], dict[int, str]]]:
        with contextlib.ExitStack() as stack:
            ok, why = set(), {}
            for vmid in sorted(vmids):
                if vmid not in expected:
                    ok.add(vmid)
                    continue
                try:
                    stack.enter_context(vm_guard(settings, vmid, expected[vmid]))
                    ok.add(vmid)
                except VmBusy:
                    why[vmid] = "skipped: the VM is busy"
                except VmChanged:
                    why[vmid] = "skipped: the VM started or stopped meanwhile"
            yield frozenset(ok), why

    return guard


def vm_busy(settings: Settings, vmid: int, proc_locks: Path = Path("/proc/locks")) -> bool:
    """True while someone holds Proxmox's lock of VM `vmid` (a start, stop, migration or
    `qm set` is under way)."""
    return held_vm_locks(settings, proc_locks)(vmid)


def held_vm_locks(settings: Settings, proc_locks: Path = Path("/proc/locks")) -> Callable[[int], bool]:
    """Whether Proxmox's lock of a VM is held, for any VM, from one reading of /proc/locks:
    probing with flock would make a Proxmox task that asks at the same moment print
    "trying to acquire lock" and wait."""
    try:
        lines = proc_locks.read_text().splitlines()
    except OSError as err:
        raise AgentError(f"cannot read {proc_locks}: {err.strerror}", "is /proc mounted?") from err
    held = set()
    for line in lines:
        # `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`; `1: -> FLOCK ...` is a waiter.
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            held.add((int(major, 16), int(minor, 16), int(inode)))
        except ValueError:
            continue  # a line in a form this code does not know: not a VM lock

    def is_held(vmid: int) -> bool:
        try:
            lock = os.stat(settings.vm_lock(vmid))
        except FileNotFoundError:
            return False
        return (os.major(lock.st_dev), os.minor(lock.st_dev), lock.st_ino) in held

    return is_held
