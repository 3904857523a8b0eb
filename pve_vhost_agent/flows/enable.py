"""Installing the hookscript into a storage and setting it on VMs (`install-hook`, `enable`, `disable`).

A VM has one hookscript. `enable` records the one it had (cluster-wide, in the spec
file) and the agent's hookscript runs it after its own work; `disable` puts it back.
Both change the VM config the way `qm set` does: under the VM lock, atomically, and
together with the args line, so a VM never starts with one and not the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from pve_vhost_agent.adapters import pvefs, sockets
from pve_vhost_agent.adapters import storage as storagecfg
from pve_vhost_agent.plan.args import ArgsPlan
from pve_vhost_agent.plan.argsync import sync_args
from pve_vhost_agent.errors import ConfigConflict, NotFound
from pve_vhost_agent.model.names import HOOK_NAME, hook_volume, is_agent_hook
from pve_vhost_agent.model.spec import VmSpec
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.adapters.specstore import load_spec, update_spec
from pve_vhost_agent.flows.vmargs import qemu_version_for, sync_for
from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig
from pve_vhost_agent.adapters.vmstore import VmLocation, check_writable, find_vm, update_vm_config, vm_running

# The checkout's copy first (tests, demo), then the package's.
HOOK_SOURCES = (
    Path(__file__).resolve().parents[2] / "hookscripts" / HOOK_NAME,
    Path("/usr/share/pve-vhost-agent") / HOOK_NAME,
)


def hook_source() -> Path:
    for path in HOOK_SOURCES:
        if path.is_file():
            return path
    raise NotFound(f"the hookscript is not at {' nor '.join(map(str, HOOK_SOURCES))}",
                   "reinstall the package: apt install --reinstall pve-vhost-agent")


def install(settings: Settings, storage: str, dry_run: bool = False) -> tuple[Path, bool]:
    """Copy the hookscript into `storage`'s snippets/ folder; (path, whether it changed)."""
    target = storagecfg.snippets_dir(settings, storage) / HOOK_NAME
    content = hook_source().read_bytes()
    if target.is_file() and target.read_bytes() == content and os.access(target, os.X_OK):
        return target, False
    if dry_run:
        return target, True
    sockets.create_folders(target.parent, "snippets folder")  # 0755 whatever the umask: root runs what is in it
    pvefs.remove_stale_temp_files(target.parent, f".{HOOK_NAME}")  # of an install killed before its rename
    tmp = target.with_name(f".{HOOK_NAME}.tmp.{os.getpid()}")
    try:
        tmp.write_bytes(content)
        tmp.chmod(0o755)  # Proxmox refuses a hookscript without the run bit
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, True


def check_enable(settings: Settings, location: VmLocation, vm: VmSpec, again: str) -> str | None:
    """Refuse, before anything is installed or written, what would make an enabled VM
    fail: another node's VM, one Proxmox has locked, a hookscript of its own that Proxmox
    could not run (the agent's chains it in every phase), a socket folder its start would
    refuse. The VM's own hookscript to chain, if it has one; `again` is the command to rerun."""
    check_writable(location)
    before = location.config.section(MAIN).get("hookscript")
    chained = before if before and not is_agent_hook(before) else None
    if chained:
        storagecfg.runnable_snippet(settings, chained, f"VM {vm.vmid}'s hookscript",
                                    f"restore it, or take it off the VM (qm set {vm.vmid} --delete hookscript), "
                                    f"then run `{again}` again")
    for folder in _socket_folders(settings, vm):
        sockets.check_folder(folder)
    return chained


def enable(settings: Settings, vmid: int, storage: str, dry_run: bool = False) -> list[str]:
    ours = hook_volume(storage)
    location = find_vm(settings, vmid)
    cluster = load_spec(settings)
    vm = cluster.for_vm(vmid)
    before = check_enable(settings, location, vm, f"pve-vhost-agent enable {vmid}")
    # Plan before writing anything: a VM the agent must refuse gets nothing written.
    version = qemu_version_for(settings, vm)  # once, before the lock: nothing slow runs while it is held
    planned = sync_for(settings, vm, location.config.with_value("hookscript", ours), bool(location.running), version)
    path, installs = install(settings, storage, dry_run)
    if dry_run:
        lines = [f"dry run: VM {vmid}: would " + ("install the hookscript at {path} and " if installs else "")
                 .format(path=path) + f"set hookscript: {ours}"]
        if before:
            lines.append(f"dry run: VM {vmid}: would run its hookscript {before} after the agent's")
        if not planned.in_sync:
            lines.append(f"dry run: VM {vmid}: would write args: {planned.line_after or '(none)'}")
        return lines
    lines = []
    if before:
        update_spec(settings, lambda spec: spec.with_hook(vmid, before))
        lines.append(f"VM {vmid}: its hookscript {before} will run after the agent's, in every phase")

    def change(config: VmConfig) -> VmConfig:
        with_hook = config.with_value("hookscript", ours)
        return sync_for(settings, vm, with_hook, vm_running(settings, vmid), version).config_after

    update = update_vm_config(settings, vmid, change)
    verb = "set to" if update.changed else "already"
    lines.insert(0, f"VM {vmid}: hookscript {verb} {ours} ({path})")
    lines += make_socket_folders(settings, vm)
    if vm.nics:
        lines.append(f"VM {vmid}: args line planned for {', '.join(n.name for n in vm.nics)} is in its config")
    lines.append("every node this VM may run on needs pve-vhost-agent installed: a migration or HA "
                 "target runs the hookscript's pre-start")
    return lines


def make_socket_folders(settings: Settings, vm: VmSpec) -> list[str]:
    """The VM's socket folders, made now (pre-start would make them too): an external
    switch (VPP/TNSR) creates its server socket there before the VM can start."""
    return [f"socket folder {folder} made for the {folder.name} backend"
            for folder in _socket_folders(settings, vm) if sockets.make_folder(folder)]


def _socket_folders(settings: Settings, vm: VmSpec) -> list[Path]:
    return [settings.socket_dir(backend) for backend in sorted({nic.backend.value for nic in vm.nics})]


def disable(settings: Settings, vmid: int, dry_run: bool = False) -> list[str]:
    location = find_vm(settings, vmid)
    cluster = load_spec(settings)
    vm = cluster.for_vm(vmid)
    if location.running and vm.nics:
        raise ConfigConflict(
            f"VM {vmid} is running with vhost-user NICs; without the hookscript nothing would remove its ports when it stops",
            f"stop the VM first (qm shutdown {vmid}), then disable it",
        )
    previous = vm.chained_hook.hookscript if vm.chained_hook else None

    def change(config: VmConfig) -> VmConfig:
        current = config.section(MAIN).get("hookscript")
        if is_agent_hook(current):
            config = config.with_value("hookscript", previous)
        return sync_args(config, ArgsPlan(), vm_running(settings, vmid), marked=()).config_after  # GUI marks go too

    if dry_run:
        after = change(location.config)
        if after.text == location.config.text:
            return [f"dry run: VM {vmid}: nothing to undo"]
        return [f"dry run: VM {vmid}: would write hookscript: {after.section(MAIN).get('hookscript') or '(none)'}"
                f" and args: {after.effective().get('args') or '(none)'}"]
    update = update_vm_config(settings, vmid, change)
    if previous:
        update_spec(settings, lambda spec: spec.with_hook(vmid, None))
    if not update.changed:
        return [f"VM {vmid}: the agent's hookscript and args were not set"]
    restored = f"hookscript back to {previous}" if previous else "hookscript removed"
    return [f"VM {vmid}: {restored}; the agent's args removed (its spec stays: pve-vhost-agent nic list {vmid})"]
