"""Plan Open vSwitch changes: a VM's spec and the observed OVS state in, actions out.

Pure: no I/O, no OVS import. The same functions serve the hook phases and the service;
they differ only in which one is called and when:

- `plan_vhost_ports` (pre-start): the bridge, vlan-limit and vhost-user ports of a VM;
- `plan_tap_qinq` (post-start, after Proxmox plugged its tap ports): QinQ on those taps;
- `plan_vm` both; `plan_vm_removal` (post-stop) and `plan_gc` (the service) undo them;
- `plan_live_vhost_ports` (service, `nic` commands): what of `plan_vhost_ports` a running
  VM can take now, and what waits for its next start.

The agent never edits or deletes a row it does not own (see ovsstate's external_ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pve_vhost_agent.errors import NotFound, OvsRefused, OwnershipError
from pve_vhost_agent.model.actions import (
    AddVhostPort, CheckVlanHeaders, DelPort, DropDatapath, EnsureBridge, EnsureDatapath, Action,
    ReplaceVhostPort, RestoreTapVlan, SetPortMtu, SetPortVlan, SetTapQinQ, SetVlanLimit,
)
from pve_vhost_agent.model.ovs import RESTART_FIX, OWNS_DATAPATH, OWNS_PORT, OWNS_VLAN, VHOST_CLIENT, OvsPort, OvsState, PortVlan
from pve_vhost_agent.model.spec import VhostNic, VlanPolicy, VmSpec

VHOST_DATAPATH = "netdev"  # vhost-user ports need the userspace datapath
QINQ_VLAN_LIMIT = 2


def plan_vm(spec: VmSpec, state: OvsState, socket_dir: Path, *, create_bridges: bool = True) -> tuple[Action, ...]:
    """Everything for a running VM: its vhost-user ports and QinQ on its taps."""
    return plan_vhost_ports(spec, state, socket_dir, create_bridges=create_bridges) + plan_tap_qinq(spec, state)


def plan_vhost_ports(
    spec: VmSpec, state: OvsState, socket_dir: Path, *, create_bridges: bool = True
) -> tuple[Action, ...]:
    """Bridges, vlan-limit and vhost-user ports for `spec`'s OVS-backed NICs.

    Owned vhost-user ports of the VM that the spec no longer lists are deleted.
    """
    nics = spec.ovs_nics
    if nics:
        _check_vhost_support(state)
    bridges: list[Action] = []
    for name in sorted({n.bridge for n in nics}):
        bridges.extend(_ensure_bridge(name, state, create_bridges))
    qinq_datapaths = {VHOST_DATAPATH} if any(n.vlan.qinq for n in nics) else set()

    ports: list[Action] = []
    wanted = set()
    for nic in nics:
        wanted.add(nic.port_name)
        ports.extend(_vhost_port(nic, state, socket_dir))
    for port in state.owned_ports(spec.vmid):
        if port.owner == OWNS_PORT and port.name not in wanted:
            ports.append(DelPort(port.name, port.bridge, spec.vmid))
    return _with_vlan_limit(state, qinq_datapaths, bridges + ports)


def plan_live_vhost_ports(
    spec: VmSpec, state: OvsState, socket_dir: Path, served: Iterable[str]
) -> tuple[tuple[Action, ...], tuple[str, ...]]:
    """For a running VM: (the port changes safe now, what takes effect at its next start).

    VLAN columns and MTU change in place, and a port QEMU serves a socket for (`served`:
    socket file names) is added again when missing. A port the running QEMU is connected
    to is never deleted or replaced, and bridges are made only at pre-start (a new one
    must be probed with the right vlan-limit before any port of a running VM needs it).
    """
    now: list[Action] = []
    later: list[str] = []
    sockets = set(served)
    for action in plan_vhost_ports(spec, state, socket_dir):
        why = _not_while_running(action, state, sockets)
        if why:
            later.append(f"VM {spec.vmid}: {why} takes effect at the next start")
        else:
            now.append(action)
    if all(isinstance(a, _PREPARATIONS) for a in now):
        now = []  # vlan-limit and datapath steps only serve port changes
    return tuple(now), tuple(later)


_PREPARATIONS = (SetVlanLimit, DropDatapath, EnsureDatapath, CheckVlanHeaders)


def _not_while_running(action: Action, state: OvsState, served: set[str]) -> str:
    if isinstance(action, EnsureBridge):
        return f"creating bridge {action.bridge}"
    if isinstance(action, ReplaceVhostPort):
        return f"re-creating port {action.port} ({action.reason})"
    if isinstance(action, DelPort):
        return f"removing port {action.port} (QEMU still has its NIC)"
    if isinstance(action, AddVhostPort):
        if state.bridge(action.bridge) is None:
            return f"port {action.port} on the new bridge {action.bridge}"
        if Path(action.socket).name not in served:
            return f"port {action.port} (the running QEMU has no {action.nic} yet)"
    return ""


def plan_tap_qinq(spec: VmSpec, state: OvsState) -> tuple[Action, ...]:
    """dot1q-tunnel on the VM's Proxmox tap ports; restore taps the spec no longer lists."""
    actions: list[Action] = []
    datapaths = set()
    wanted = set()
    for entry in spec.tap_qinq:
        port = state.port(entry.port_name)
        if port is None or not port.bridge:
            raise NotFound(
                f"VM {entry.vmid} {entry.name}: Open vSwitch has no port {entry.port_name}",
                f"QinQ needs the VM running with {entry.name} on an OVS bridge and firewall=0",
            )
        if port.owner not in ("", OWNS_VLAN) or (port.owner and port.vmid != entry.vmid):
            raise _foreign(port, f"VM {entry.vmid} {entry.name}")
        datapaths.add(state.bridge(port.bridge).datapath)
        wanted.add(port.name)
        vlan = PortVlan.of_policy(VlanPolicy(qinq=entry.qinq))
        if port.owner == OWNS_VLAN and port.vlan == vlan:
            continue
        saved = port.vlan if not port.owner else (port.saved_vlan or PortVlan())
        actions.append(SetTapQinQ(port.name, entry.vmid, entry.name, vlan, saved))
    for port in state.owned_ports(spec.vmid):
        if port.owner == OWNS_VLAN and port.name not in wanted:
            actions.append(_restore(port))
    return _with_vlan_limit(state, datapaths, actions)


def plan_vm_removal(vmid: int, state: OvsState) -> tuple[Action, ...]:
    """Post-stop: delete the VM's vhost-user ports, give its taps back Proxmox's settings."""
    return tuple(_undo(port) for port in state.owned_ports(vmid))


def plan_gc(live_vmids: Iterable[int], state: OvsState) -> tuple[Action, ...]:
    """Undo what the agent did for VMs not in `live_vmids` (e.g. migrated away: no hook ran)."""
    live = set(live_vmids)
    return tuple(_undo(p) for p in state.owned_ports() if p.vmid is not None and p.vmid not in live)


# --- pieces -------------------------------------------------------------------------


def _vhost_port(nic: VhostNic, state: OvsState, socket_dir: Path) -> tuple[Action, ...]:
    add = AddVhostPort(
        nic.port_name, nic.bridge, nic.vmid, nic.name, str(socket_dir / nic.socket_name),
        PortVlan.of_policy(nic.vlan), nic.mtu,
    )
    port = state.port(nic.port_name)
    if port is None:
        return (add,)
    if port.owner != OWNS_PORT or port.vmid != nic.vmid or port.nic != nic.name:
        raise _foreign(port, f"VM {nic.vmid} {nic.name}")
    iface = port.interface
    if port.bridge != nic.bridge:
        return (ReplaceVhostPort(f"bridge {port.bridge or '(none)'} -> {nic.bridge}", add),)
    if iface is None or iface.type != VHOST_CLIENT:
        return (ReplaceVhostPort(f"interface is not a single {VHOST_CLIENT}", add),)
    if iface.socket_path != add.socket:
        return (ReplaceVhostPort(f"socket {iface.socket_path} -> {add.socket}", add),)
    actions: list[Action] = []
    if port.vlan != add.vlan:
        actions.append(SetPortVlan(port.name, add.vlan, nic.vmid))
    if iface.mtu_request != nic.mtu:
        actions.append(SetPortMtu(port.name, nic.mtu, nic.vmid))
    return tuple(actions)


def _ensure_bridge(name: str, state: OvsState, create: bool) -> tuple[Action, ...]:
    bridge = state.bridge(name)
    if bridge is None:
        if not create:
            raise NotFound(
                f"Open vSwitch bridge {name} does not exist",
                f"create it: ovs-vsctl add-br {name} -- set bridge {name} datapath_type={VHOST_DATAPATH}",
            )
        return (EnsureBridge(name, VHOST_DATAPATH),)
    if bridge.datapath != VHOST_DATAPATH:
        raise OvsRefused(
            f"bridge {name} uses the {bridge.datapath} datapath, but vhost-user ports need a "
            f"{VHOST_DATAPATH} (userspace) bridge",
            f"declare the NIC on a {VHOST_DATAPATH} bridge (a new name lets the agent create one)",
        )
    return ()


def _check_vhost_support(state: OvsState) -> None:
    # iface_types is empty until ovs-vswitchd has run once: nothing to judge then.
    if state.iface_types and VHOST_CLIENT not in state.iface_types:
        raise OvsRefused(
            f"ovs-vswitchd cannot make vhost-user ports ({VHOST_CLIENT} is not among its interface types)",
            "run the DPDK build (update-alternatives --set ovs-vswitchd "
            "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk) with other_config:dpdk-init=true, "
            "then restart openvswitch-switch",
        )


def _with_vlan_limit(state: OvsState, qinq_datapaths: set[str], actions: list[Action]) -> tuple[Action, ...]:
    limit = _vlan_limit(state, qinq_datapaths)
    if not actions:  # nothing to change: no need to learn what a datapath probed
        limit = tuple(a for a in limit if isinstance(a, SetVlanLimit))
    return limit + tuple(actions)


def _vlan_limit(state: OvsState, qinq_datapaths: set[str]) -> tuple[Action, ...]:
    """vlan-limit for QinQ on ports of these datapath types; refuse what is not safe.

    Each datapath probes its VLAN depth once, when ovs-vswitchd creates it, bounded by
    vlan-limit; raising the limit later breaks double-tagged flows on that datapath.
    So the agent sets it only while no datapath exists (or every one in use was
    already probed with two headers), and otherwise says how to fix it.

    A limit of 2 proves nothing about a datapath already running (it may have been set
    at runtime): only a Datapath row's capabilities say what was probed. OVS has no such
    row by default, so the agent makes its own and checks what ovs-vswitchd reports.
    """
    if not qinq_datapaths:
        return ()
    limit = state.vlan_limit
    if limit == 0 or limit >= QINQ_VLAN_LIMIT:
        actions: list[Action] = []
        for dp in sorted(qinq_datapaths):
            probed = state.probed_headers(dp)
            if probed is not None and probed < QINQ_VLAN_LIMIT:
                raise OvsRefused(
                    f"QinQ needs two VLAN headers, but the {dp} datapath was probed with {probed} "
                    f"(other_config:vlan-limit was set after ovs-vswitchd created it)",
                    RESTART_FIX,
                )
            # A datapath not running yet is probed with this limit when the bridge comes.
            owner = state.datapath_owners.get(dp)
            if probed is None and dp in state.datapaths_in_use() and owner in (None, OWNS_DATAPATH):
                # ovs-vswitchd fills only a row new to it: an empty one of ours is made anew.
                renew = (DropDatapath(dp),) if owner else ()
                actions += [*renew, EnsureDatapath(dp), CheckVlanHeaders(dp, QINQ_VLAN_LIMIT)]
        return tuple(actions)
    in_use = state.datapaths_in_use()
    if all((state.probed_headers(dp) or 0) >= QINQ_VLAN_LIMIT for dp in in_use):
        return (SetVlanLimit(QINQ_VLAN_LIMIT, state.other_config.get("vlan-limit", "")),)
    raise OvsRefused(
        f"QinQ needs Open vSwitch other_config:vlan-limit 2 or 0, but it is {limit} and "
        f"ovs-vswitchd already runs the {', '.join(in_use)} datapath (bridges "
        f"{', '.join(b.name for b in state.bridges)}), which probed its VLAN depth with that limit",
        f"run `ovs-vsctl set Open_vSwitch . other_config:vlan-limit=2`, then {RESTART_FIX}",
    )


def _undo(port: OvsPort) -> Action:
    return DelPort(port.name, port.bridge, port.vmid) if port.owner == OWNS_PORT else _restore(port)


def _restore(port: OvsPort) -> RestoreTapVlan:
    # A saved value someone mangled gives Proxmox's default: no tag, all VLANs.
    return RestoreTapVlan(port.name, port.saved_vlan or PortVlan(), port.vmid)


def _foreign(port: OvsPort, wanted_by: str) -> OwnershipError:
    who = f"owner={port.owner} vmid={port.vmid} {port.nic}".strip() if port.owner else "no pve-vhost-agent external_ids"
    return OwnershipError(
        f"{wanted_by} needs OVS port {port.name}, but that port is not the agent's ({who})",
        f"remove or rename that port (ovs-vsctl del-port {port.name}) if it is stale; the agent never takes over ports",
    )
