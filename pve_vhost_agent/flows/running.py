"""A running VM's vhost-user ports brought in step at once (`nic add|set|remove`): an edge.

The same planner and lock rule as the service: ovsplan.plan_live_vhost_ports says what a
running QEMU can take now, and Proxmox's VM lock is held only to re-check that the VM
still runs and to commit, never while ovs-vswitchd applies the change.
"""

from __future__ import annotations

from pve_vhost_agent.errors import VmChanged
from pve_vhost_agent.flows.observe import ovs_sockets
from pve_vhost_agent.model.actions import AddVhostPort, OvsAction, SetPortMtu, SetPortVlan
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ovs import plan_live_vhost_ports
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import Backend, VmSpec
from pve_vhost_agent.adapters.vmstore import vm_guard


def follow_running_vm(settings: Settings, spec: VmSpec, dry_run: bool) -> list[str]:
    """Apply what the running VM can take now; one line per change and per deferred one."""
    with Ovsdb.from_settings(settings) as db:
        now, later = plan_live_vhost_ports(spec, db.snapshot(), settings.socket_dir(Backend.OVS.value),
                                           ovs_sockets(settings))
        if now and not dry_run:
            try:
                db.apply(now, lambda: vm_guard(settings, spec.vmid, True))
            except VmChanged:
                return [f"VM {spec.vmid} stopped meanwhile: its ports follow the spec at its next start"]
    verb = "dry run: would set" if dry_run else "set"
    lines = [f"VM {spec.vmid}: {verb} {_change(a)} (running VM, at once)" for a in now if _change(a)]
    return lines + list(later)


def _change(action: OvsAction) -> str:
    if isinstance(action, SetPortVlan):
        return f"port {action.port} VLAN to {action.vlan}"
    if isinstance(action, SetPortMtu):
        return f"port {action.port} MTU to {action.mtu or 'the default'}"
    if isinstance(action, AddVhostPort):
        return f"port {action.port} on {action.bridge} again (it was missing)"
    return ""  # vlan-limit and datapath steps: shown by --dry-run of the plan, not here
