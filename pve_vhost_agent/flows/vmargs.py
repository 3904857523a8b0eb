"""Plan and write a VM's args line: spec + VM config + installed QEMU (an edge).

Shared by `show`, `apply`, the hook's pre-start check and the service: they differ only
in whether they write.
"""

from __future__ import annotations

import dataclasses
import logging

from pve_vhost_agent.adapters import qemu
from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.plan.argsync import ArgsSync, sync_args
from pve_vhost_agent.errors import AgentError, NotEnabled
from pve_vhost_agent.flows.bug import unexpected
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import ClusterSpec, VmSpec
from pve_vhost_agent.adapters.specstore import load_spec, load_vm_spec
from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig
from pve_vhost_agent.model.names import is_agent_hook
from pve_vhost_agent.adapters.vmstore import VmLocation, find_vm, local_vm_configs, update_vm_config, vm_running

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VmArgs:
    """A VM, its spec, and where its args stand."""

    location: VmLocation
    spec: VmSpec
    sync: ArgsSync

    @property
    def enabled(self) -> bool:
        """The VM has the agent's hookscript: its ports are made at every start."""
        return is_agent_hook(self.location.config.section(MAIN).get("hookscript"))

    @property
    def dead_nics(self) -> tuple[str, ...]:
        """vhost-user NICs the VM would start with but nothing would make a port for (the
        agent's args without its hookscript: QEMU waits for a switch that never comes)."""
        if self.enabled or not self.sync.plan.args:
            return ()
        return tuple(nic.name for nic in self.spec.nics)


def not_enabled(result: VmArgs) -> NotEnabled:
    vmid = result.location.vmid
    return NotEnabled(
        f"VM {vmid} does not have the agent's hookscript: its vhost-user NICs ({', '.join(result.dead_nics)}) would "
        "start with no Open vSwitch port, since nothing makes one",
        f"run `pve-vhost-agent enable {vmid}` (or `pve-vhost-agent enable --all`); `apply --force` writes the args anyway")


def qemu_version_for(settings: Settings, vm: VmSpec) -> tuple[int, int, int]:
    """The installed QEMU's version, asked only when `vm`'s args depend on it: the answer
    hooks and the service keep (keyed by the binary's identity, see adapters/qemu), else
    QEMU itself. Commands only read that cache (a dry run writes nothing): `apply --all`
    and the service's args writes do not start QEMU once per VM."""
    return qemu.installed_version(cache_dir=settings.run_dir, remember=False) if vm.nics else (0, 0, 0)


def sync_for(settings: Settings, vm: VmSpec, config: VmConfig, running: bool,
             version: tuple[int, int, int] | None = None) -> ArgsSync:
    """Plan `vm`'s args against `config` (pass `version` when calling under a lock)."""
    version = qemu_version_for(settings, vm) if version is None else version
    plan = plan_args(vm, config.effective(), version, settings.socket_dirs())
    # An enabled VM carries the GUI marks of its vhost-user NICs (plan/marks); others keep theirs.
    enabled = is_agent_hook(config.section(MAIN).get("hookscript"))
    return sync_args(config, plan, running, vm.nics if enabled else None)


def vm_args(settings: Settings, vmid: int, cluster: ClusterSpec | None = None) -> VmArgs:
    """Where VM `vmid`'s args stand (raises NotFound, ConfigConflict, MemoryLayoutError)."""
    cluster = load_spec(settings) if cluster is None else cluster
    location = find_vm(settings, vmid)
    vm = cluster.for_vm(vmid)
    return VmArgs(location, vm, sync_for(settings, vm, location.config, bool(location.running)))


def apply_vm_args(settings: Settings, vmid: int, cluster: ClusterSpec | None = None) -> VmArgs:
    """Write the planned args under the VM lock, planned again on the config and the VM's
    spec file as they are under it: of two declarations in parallel, the one that writes
    the args last writes them for both."""
    cluster = load_spec(settings) if cluster is None else cluster
    first = vm_args(settings, vmid, cluster)  # refusals and no-ops touch nothing, not even the lock
    if first.sync.in_sync:
        return first
    version = qemu_version_for(settings, first.spec)  # before the lock: nothing slow runs while it is held
    result: list[tuple[VmSpec, ArgsSync]] = []

    def change(config: VmConfig) -> VmConfig:
        vm = load_vm_spec(settings, vmid)
        known = version if first.spec.nics or not vm.nics else qemu_version_for(settings, vm)
        sync = sync_for(settings, vm, config, vm_running(settings, vmid), known)
        result.append((vm, sync))
        return sync.config_after

    update = update_vm_config(settings, vmid, change)
    vm, sync = result[-1]
    if not update.changed and not sync.in_sync:
        raise AgentError(
            f"VM {vmid}: its args line is not as planned ({'; '.join(sync.changes)}) but writing the config "
            "changes nothing",
            f"this is a bug: report it with /etc/pve/qemu-server/{vmid}.conf",
        )
    if update.changed:
        log.info("VM %s: args line written to the %s section", vmid, sync.section,
                 extra={"vmid": vmid, "action": "WriteVmArgs", "result": "changed"})
    return VmArgs(update.location, vm, sync)


def vms_to_apply(settings: Settings, cluster: ClusterSpec) -> list[int]:
    """This node's VMs that have a spec, or agent args left over from a removed spec (an
    unreadable config is listed too, so that `apply --all` reports it)."""
    return [vmid for vmid, config in local_vm_configs(settings)
            if isinstance(config, AgentError) or cluster.for_vm(vmid)
            or qemuargs.agent_args(config.effective().get("args", ""))]


def vms_to_enable(settings: Settings) -> list[int]:
    """This node's VMs with declarations but without the agent's hookscript (`enable --all`)."""
    cluster = load_spec(settings)
    return [vmid for vmid, config in local_vm_configs(settings)
            if not isinstance(config, AgentError) and not is_agent_hook(config.section(MAIN).get("hookscript"))
            and (cluster.for_vm(vmid).nics or cluster.for_vm(vmid).tap_qinq)]


def apply_vms(settings: Settings, vmid: int | None, dry_run: bool,
              force: bool = False) -> list[tuple[int, VmArgs | AgentError]]:
    """`apply VMID` or, with None, every VM of this node that needs it (`apply --all`):
    each VM's result or its error (one VM's problem never stops the others). A VM whose
    args would name vhost-user NICs without the agent's hookscript is refused (NotEnabled)
    unless `force`."""
    cluster = load_spec(settings)
    vmids = vms_to_apply(settings, cluster) if vmid is None else [vmid]
    results: list[tuple[int, VmArgs | AgentError]] = []
    for one in vmids:
        try:
            planned = vm_args(settings, one, cluster)
            if planned.dead_nics and planned.location.local and not force:
                raise not_enabled(planned)
            results.append((one, planned if dry_run else apply_vm_args(settings, one, cluster)))
        except AgentError as err:
            if vmid is not None:
                raise
            results.append((one, err))
        except Exception as err:  # noqa: BLE001 - a bug with one VM must not stop the others
            if vmid is not None:
                raise
            results.append((one, unexpected(err)))
    return results
