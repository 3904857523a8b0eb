"""A running VM's ports: brought in step at once (`nic add|set|remove`), and shown (`ovs status`).

The same planner and lock rule as the service: plan.ovs.plan_live_vhost_ports says what a
running QEMU can take now, and Proxmox's VM lock is held only to re-check that the VM
still runs and to commit, never while ovs-vswitchd applies the change.
"""

from __future__ import annotations

import logging

from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.flows.apply import apply_plan
from pve_vhost_agent.flows.observe import ovs_sockets
from pve_vhost_agent.model.names import vm_port_names
from pve_vhost_agent.model.ovs import port_report
from pve_vhost_agent.model.spec import Backend, VmSpec
from pve_vhost_agent.plan.ovs import plan_live_vhost_ports
from pve_vhost_agent.settings import Settings

log = logging.getLogger(__name__)


def follow_running_vm(settings: Settings, spec: VmSpec, dry_run: bool) -> list[str]:
    """Apply what the running VM can take now; one line per change and per deferred one."""
    with Ovsdb.from_settings(settings) as db:
        now, later = plan_live_vhost_ports(spec, db.snapshot(), settings.socket_dir(Backend.OVS.value),
                                           ovs_sockets(settings))
        if dry_run:
            return [f"VM {spec.vmid}: dry run: would {a.sentence()} (running VM, at once)" for a in now] + list(later)
        applied = apply_plan(settings, now, log, db=db, guards={spec.vmid: True})
    lines = [f"VM {spec.vmid}: {a.sentence()} (running VM, at once)" for a in applied.done]
    if applied.skipped:
        why = applied.skipped[0][1].removeprefix("skipped: ")
        lines.append(f"VM {spec.vmid}: not changed now ({why}); its ports follow the spec at its next start")
    return lines + list(later)


def port_reports(settings: Settings, vmid: int) -> list[dict]:
    """The Open vSwitch ports the agent made or changed for VM `vmid`, as plain values."""
    with Ovsdb.from_settings(settings, ports=vm_port_names(vmid)) as db:
        return [port_report(port) for port in db.snapshot().owned_ports(vmid)]
