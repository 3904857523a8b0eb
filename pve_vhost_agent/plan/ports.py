"""Did ovs-vswitchd open the vhost-user ports it was given? Pure: spec + OVS state in.

A port row only says OVSDB has it. ovs-vswitchd reports what it made of it in the
Interface: `ofport` (empty until it has tried, -1 when it failed) and `error`. QEMU,
the socket server of backend `ovs`, waits at start until OVS connects; a port OVS could
not open would hang the start, so pre-start refuses it with OVS's own words.
"""

from __future__ import annotations

from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.model.spec import VmSpec


def port_problems(vm: VmSpec, state: OvsState) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(problems, ports ovs-vswitchd has not reported on yet) for `vm`'s `ovs` NICs."""
    problems, waiting = [], []
    for nic in vm.ovs_nics:
        port = state.port(nic.port_name)
        iface = port.interface if port else None
        if iface is None:
            problems.append(f"VM {vm.vmid} {nic.name}: Open vSwitch has no interface {nic.port_name}")
        elif iface.error or iface.ofport == -1:
            said = iface.error or "ofport -1, no error text"
            problems.append(f"VM {vm.vmid} {nic.name}: ovs-vswitchd could not open port {nic.port_name}: {said}")
        elif iface.ofport is None:
            waiting.append(nic.port_name)
    return tuple(problems), tuple(waiting)
