"""The declared spec in /etc/pve: one file per VM, changed under the cluster lock (an edge).

Each VM's declarations are /etc/pve/pve-vhost-agent/<vmid>.cfg, as Proxmox keeps one
config file per VM: a hook reads only its own VM's file, whatever the cluster holds, and
no file comes near pmxcfs's 1 MiB limit. The single file of earlier versions,
/etc/pve/pve-vhost-agent.cfg, is still read, and split into per-VM files (then removed)
by the first change made under the lock, `migrate-spec` (run by the package's postinst)
or the service's first pass; a VM file present for a VM wins over the old file's entries,
so a split cut short loses nothing.

Every node may change the files, so a change is made under Proxmox's cluster lock
(`cfs_lock` in pve-cluster): creating the folder /etc/pve/priv/lock/<id> succeeds for
exactly one holder in the whole cluster, because pmxcfs serialises mkdir through corosync
and refuses a second mkdir of the same name with EEXIST. A flock would only lock this
node. Removing the folder releases the lock, and pmxcfs expires a lock held longer than
120 s, so a crashed holder cannot block the cluster for ever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from pve_vhost_agent.adapters import pvefs
from pve_vhost_agent.errors import AgentError, AgentTimeout, SpecError
from pve_vhost_agent.formats.specfile import format_spec, parse_spec
from pve_vhost_agent.model.spec import ClusterSpec, VmSpec, is_decimal
from pve_vhost_agent.settings import Settings

# Proxmox retries the lock every 0.1 s at first, then every second.
_FIRST_RETRY, _LAST_RETRY = 0.1, 1.0

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpecUpdate:
    """The spec before and after a change (equal: nothing was written)."""

    before: ClusterSpec
    after: ClusterSpec

    @property
    def changed(self) -> bool:
        return self.before != self.after


def load_spec(settings: Settings, parsed: pvefs.ParsedFiles | None = None) -> ClusterSpec:
    """Every VM's declarations (empty when there are none); `parsed` keeps the files that
    did not change since the last call."""
    files = _vm_files(settings)
    parsed = parsed or pvefs.ParsedFiles()
    parts = [parsed.get(path, lambda text, vmid=vmid, path=path: _parsed(settings, vmid, path, text)) or ClusterSpec()
             for vmid, path in files]
    legacy = _load_legacy(settings)
    if legacy is not None:
        have = {vmid for vmid, _path in files}
        parts += [_only(legacy, vmid) for vmid in legacy.vmids() + [h.vmid for h in legacy.hooks] if vmid not in have]
    elif not files:
        pvefs.require_mounted(settings.pve_dir)  # "nothing declared" only when pmxcfs says so
    return _merged(parts)


def load_vm_spec(settings: Settings, vmid: int) -> VmSpec:
    """One VM's declarations: its own file only (the old single file while it exists)."""
    path = settings.vm_spec_file(vmid)
    text = pvefs.read_text(path)
    if text is not None:
        return _parsed(settings, vmid, path, text).for_vm(vmid)
    legacy = _load_legacy(settings)
    return legacy.for_vm(vmid) if legacy is not None else VmSpec(vmid)


def update_spec(settings: Settings, change: Callable[[ClusterSpec], ClusterSpec]) -> SpecUpdate:
    """Apply `change` to the spec under the cluster lock; write only the VM files it changed."""
    with cluster_lock(settings):
        pvefs.remove_stale_temp_files(settings.spec_dir)  # of writers killed mid-write, anywhere
        before = load_spec(settings)  # read under the lock: another node may just have written
        after = change(before)
        update = SpecUpdate(before, after)
        if update.changed:  # a refused or empty change writes nothing, not even the split
            _migrate_locked(settings)
            for vmid in sorted(set(_all_vmids(before)) | set(_all_vmids(after))):
                if _only(before, vmid) != _only(after, vmid):
                    _write_vm_file(settings, vmid, _only(after, vmid))
        return update


def migrate_spec(settings: Settings) -> int:
    """Split the old single spec file into per-VM files and remove it; the number of VMs
    moved (0 when there is nothing to move)."""
    if not settings.legacy_spec_file.exists():
        return 0
    with cluster_lock(settings):
        return _migrate_locked(settings)


def _migrate_locked(settings: Settings) -> int:
    legacy = _load_legacy(settings)
    if legacy is None:
        return 0
    have = {vmid for vmid, _path in _vm_files(settings)}
    moved = [vmid for vmid in sorted(set(_all_vmids(legacy))) if vmid not in have]
    for vmid in moved:
        _write_vm_file(settings, vmid, _only(legacy, vmid))
    pvefs.remove(settings.legacy_spec_file)
    log.info("moved the declarations of %d VMs from %s into %s", len(moved), settings.legacy_spec_file,
             settings.spec_dir)
    return len(moved)


def _vm_files(settings: Settings) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(settings.spec_dir)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise AgentError(f"cannot list {settings.spec_dir}: {err.strerror}",
                         "check that /etc/pve is mounted and readable") from err
    found = []
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and ext == "cfg" and is_decimal(stem):  # `<vmid>.cfg`; temp files and others are not
            found.append((int(stem), settings.spec_dir / name))
    return sorted(found)


def _parsed(settings: Settings, vmid: int, path: Path, text: str) -> ClusterSpec:
    parsed = parse_spec(text, str(path))
    strangers = sorted(set(_all_vmids(parsed)) - {vmid})
    if strangers:
        raise SpecError(f"{path} declares NICs of VM {strangers[0]}", f"move them to {settings.vm_spec_file(strangers[0])}")
    return parsed


def _load_legacy(settings: Settings) -> ClusterSpec | None:
    text = pvefs.read_text(settings.legacy_spec_file)
    return None if text is None else parse_spec(text, str(settings.legacy_spec_file))


def _write_vm_file(settings: Settings, vmid: int, part: ClusterSpec) -> None:
    path = settings.vm_spec_file(vmid)
    if not (part.nics or part.tap_qinq or part.hooks or part.links):
        pvefs.remove(path)
        return
    try:
        # pmxcfs fixes the modes of what is made in /etc/pve (chmod fails there).
        settings.spec_dir.mkdir(exist_ok=True)
    except OSError as err:
        raise pvefs.write_error(err, settings.spec_dir) from err
    pvefs.write_atomic(path, format_spec(part))


def _all_vmids(cluster: ClusterSpec) -> list[int]:
    return cluster.vmids() + [h.vmid for h in cluster.hooks]


def _only(cluster: ClusterSpec, vmid: int) -> ClusterSpec:
    vm = cluster.for_vm(vmid)
    return ClusterSpec(vm.nics, vm.tap_qinq, (vm.chained_hook,) if vm.chained_hook else (), vm.links)


def _merged(parts: list[ClusterSpec]) -> ClusterSpec:
    """One spec of all VMs' (the cluster-wide checks, unique MACs and link ports, apply to the whole)."""
    return ClusterSpec(tuple(n for p in parts for n in p.nics), tuple(q for p in parts for q in p.tap_qinq),
                       tuple(h for p in parts for h in p.hooks), tuple(e for p in parts for e in p.links))


@contextlib.contextmanager
def cluster_lock(settings: Settings) -> Iterator[None]:
    """Hold the agent's cluster-wide lock folder, waiting at most settings.lock_timeout."""
    lock = settings.cluster_lock_dir
    pvefs.require_mounted(settings.pve_dir)  # never make priv/lock in the bare mount point
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise pvefs.write_error(err, lock.parent) from err
    deadline = time.monotonic() + settings.lock_timeout
    pause = _FIRST_RETRY
    while True:
        try:
            lock.mkdir()
            break
        except FileExistsError:
            if time.monotonic() >= deadline:
                raise AgentTimeout(
                    f"the cluster lock {lock} is still held after {settings.lock_timeout:g} s "
                    "(another node or command is changing the spec)",
                    "retry later; pmxcfs expires a held lock after 120 s",
                ) from None
            _request_unlock(lock)
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _LAST_RETRY)
        except OSError as err:
            raise pvefs.write_error(err, lock) from err
    try:
        yield
    finally:
        try:
            lock.rmdir()
        except FileNotFoundError:
            pass  # pmxcfs expired it already
        except OSError as err:
            # Never hide the error that ended the locked block; pmxcfs expires the lock
            # after 120 s anyway.
            log.warning("could not release the cluster lock %s: %s", lock, err.strerror)


def _request_unlock(lock) -> None:
    # Proxmox's cfs_lock does the same: on pmxcfs, setting a lock folder's times to 0
    # asks pmxcfs to drop the lock if it has expired. Elsewhere it is harmless.
    try:
        os.utime(lock, (0, 0))
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise AgentError(f"cannot touch the cluster lock {lock}: {err.strerror}",
                             "check that /etc/pve is mounted") from err
