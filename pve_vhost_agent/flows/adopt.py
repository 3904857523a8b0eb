"""`adopt VMID|--all`: turn hand-written vhost-user args (and, asked for, the patched-Network.pm
QinQ convention) into declarations, and the VM's config into what the agent writes.

The declarations and the VM's config change together: the config's new args are planned
(and refused, as `apply` would refuse them) before anything is written, then the spec is
written, then the config under Proxmox's VM lock, planned again on the config read under
it; when that write fails, the declarations are taken back. The VM is enabled in the same
write (the agent's hookscript, its own chained, the GUI marks): an adopted NIC whose OVS
port the agent makes would otherwise start with no port. A running VM gets its new
args and NIC lines as pending changes, as `qm set` gives them: nothing reaches its QEMU.
"""

from __future__ import annotations

import dataclasses

from pve_vhost_agent.adapters.specstore import load_spec, update_spec
from pve_vhost_agent.adapters.vmstore import find_vm, local_vm_configs, update_vm_config, vm_running
from pve_vhost_agent.errors import AgentError, ConfigConflict, VmChanged
from pve_vhost_agent.flows import enable as enable_flow
from pve_vhost_agent.flows.declare import random_macs
from pve_vhost_agent.flows.vmargs import qemu_version_for
from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.formats.vmconfig import MAIN, PENDING, VmConfig
from pve_vhost_agent.model import spec
from pve_vhost_agent.model.names import hook_volume
from pve_vhost_agent.plan.adopt import AdoptPlan, plan_adopt
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.plan.argsync import is_hibernated, sync_args
from pve_vhost_agent.settings import Settings


@dataclasses.dataclass(frozen=True)
class Adopted:
    plan: AdoptPlan
    config_after: VmConfig | None  # None: refused
    dry_run: bool
    written: bool = False
    chained: str | None = None  # the VM's own hookscript, run after the agent's from now on


def adopt(settings: Settings, vmid: int, bridge: str, patched_qinq: bool, dry_run: bool,
          storage: str = "local") -> Adopted:
    """Plan (and unless `dry_run`, write) the adoption of VM `vmid`, enabling it with the
    hookscript in `storage`. A plan with refusals writes nothing; the caller says each refusal."""
    location = find_vm(settings, spec.check_vmid(vmid))
    if not location.local:
        raise ConfigConflict(f"VM {vmid} lives on node {location.node}", f"run this on {location.node}")
    spec.check_ifname(bridge, "bridge")
    cluster = load_spec(settings)
    plan = plan_adopt(vmid, location.config, cluster, bridge, random_macs(settings), patched_qinq)
    if plan.refusals:
        return Adopted(plan, None, dry_run)
    hook = hook_volume(storage)
    chained = enable_flow.check_enable(settings, location, _vm_after(plan, cluster), f"pve-vhost-agent adopt {vmid}")
    version = qemu_version_for(settings, spec.VmSpec(vmid, plan.nics))  # before any lock
    after = _config_after(settings, plan, cluster, location.config, bool(location.running), version, hook)
    if dry_run:
        return Adopted(plan, after, dry_run, chained=chained)
    enable_flow.install(settings, storage)

    def declare(current: spec.ClusterSpec) -> spec.ClusterSpec:
        for entry in (*plan.nics, *plan.tap_qinq):
            if current.entry(vmid, entry.index) is not None:
                raise VmChanged(f"VM {vmid} {entry.name} was declared meanwhile", "run adopt again: it plans anew")
            current = current.with_entry(entry)
        return current.with_hook(vmid, chained) if chained else current

    update_spec(settings, declare)
    try:
        written = update_vm_config(settings, vmid,
                                   lambda config: _locked(settings, plan, cluster, location.config, config, version, hook))
    except AgentError:
        update_spec(settings, lambda current: _withdrawn(current, plan, chained))  # declarations and config together
        raise
    enable_flow.make_socket_folders(settings, _vm_after(plan, cluster))
    return Adopted(plan, written.after, dry_run, written=True, chained=chained)


def adopt_all(settings: Settings, bridge: str, patched_qinq: bool, dry_run: bool,
              storage: str = "local") -> list[tuple[int, Adopted | AgentError]]:
    """Every VM of this node with hand-written vhost-user args (or patched-QinQ NICs)."""
    results: list[tuple[int, Adopted | AgentError]] = []
    for vmid, config in local_vm_configs(settings):
        if isinstance(config, AgentError) or not _has_something(config, patched_qinq):
            continue
        try:
            results.append((vmid, adopt(settings, vmid, bridge, patched_qinq, dry_run, storage)))
        except AgentError as err:
            results.append((vmid, err))
    return results


def _has_something(config: VmConfig, patched_qinq: bool) -> bool:
    values = config.effective()
    try:
        pairs = qemuargs.option_pairs(qemuargs.split_args(values.get("args", "")))
    except AgentError:
        return True  # a line adopt must refuse is worth saying
    if any(p.kind == "netdev" and p.props.get("type") == "vhost-user" and not qemuargs.is_agent_owned(p) for p in pairs):
        return True
    return patched_qinq and any(k.startswith("net") and "tag=" in v and "trunks=" in v for k, v in values.items())


def _vm_after(plan: AdoptPlan, cluster: spec.ClusterSpec) -> spec.VmSpec:
    """The VM's declarations once the adopted ones are added."""
    vm = cluster.for_vm(plan.vmid)
    return dataclasses.replace(vm, nics=vm.nics + plan.nics, tap_qinq=vm.tap_qinq + plan.tap_qinq)


def _config_after(settings: Settings, plan: AdoptPlan, cluster: spec.ClusterSpec, config: VmConfig, running: bool,
                  version: tuple[int, int, int], hook: str) -> VmConfig:
    """The VM config with the adopted NIC lines, the agent's hookscript, args and GUI
    marks (refused as `apply` would refuse it: ballooning, memory hotplug, a clash with the
    user's words...). The hookscript is set at once, as `qm set` sets it on a running VM."""
    later = running or is_hibernated(config.section(MAIN))
    for key, value in plan.net_values.items():
        config = config.with_value(key, value, PENDING if later else MAIN)
    config = config.with_value("hookscript", hook)
    vm = _vm_after(plan, cluster)
    values = dict(config.effective())
    values["args"] = plan.user_args or ""
    args = plan_args(vm, values, version, settings.socket_dirs())
    return sync_args(config, args, running, vm.nics, user_line=plan.user_args or "").config_after


def _locked(settings: Settings, plan: AdoptPlan, cluster: spec.ClusterSpec, before: VmConfig, config: VmConfig,
            version: tuple[int, int, int], hook: str) -> VmConfig:
    """The config to write, planned again on the one read under the VM's lock (which must
    still have the args and NIC lines the plan was made from)."""
    changed = [key for key in ("args", "hookscript", *plan.net_values)
               if config.effective().get(key) != before.effective().get(key)]
    if changed:
        raise VmChanged(f"VM {plan.vmid}'s {changed[0]} changed while it was adopted", "run adopt again: it plans anew")
    return _config_after(settings, plan, cluster, config, vm_running(settings, plan.vmid), version, hook)


def _withdrawn(cluster: spec.ClusterSpec, plan: AdoptPlan, chained: str | None) -> spec.ClusterSpec:
    for entry in (*plan.nics, *plan.tap_qinq):
        if cluster.entry(plan.vmid, entry.index) == entry:
            cluster = cluster.without(plan.vmid, entry.index)
    return cluster.with_hook(plan.vmid, None) if chained else cluster
