"""VM-to-VM links: declaring them, and where each running end's UDP socket must point. Pure.

A link joins two VM NICs point to point: frames of any kind (LLDP, STP BPDUs, ...) pass,
as on a wire. Each end is a virtio-net device on a QEMU hub (args: `-netdev hubport`, in
the PCI slot Proxmox reserves for its netN) and, once QEMU runs, a UDP socket on that hub
that the agent makes itself: bound to this end's address and port and *connected* to the
peer's, then handed to QEMU (QMP `getfd` + `netdev_add dgram`). QEMU's own `-netdev
dgram` takes a datagram from any sender; a connected socket gets only the peer's (the
kernel drops the rest), and a new socket can replace it while the guest runs, so an end
follows its peer to another node without a restart. The args name no address at all:
they are the same on every node.

Addresses: ends on one node talk over 127.0.0.1; ends on different nodes use each
node's `ring0_addr` from corosync.conf. A VM is on the node whose folder holds its config.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Iterable, Mapping, Sequence

from pve_vhost_agent.errors import AgentError, ConfigConflict, NotFound, SpecError
from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.model import names, spec
from pve_vhost_agent.model.actions import Action
from pve_vhost_agent.model.linkactions import ConnectLink, DisconnectLink
from pve_vhost_agent.model.links import Attached, LinkFacts, RunningLinks
from pve_vhost_agent.model.names import Address
from pve_vhost_agent.plan.declare import vm_nets

LOOPBACK = "127.0.0.1"


# --- declaring ------------------------------------------------------------------------


def free_ports(cluster: spec.ClusterSpec, count: int) -> tuple[int, ...]:
    """The `count` lowest ports of the link range that no link end holds (cluster-wide)."""
    held = {end.port for end in cluster.links}
    found = []
    for port in range(spec.LINK_PORT_MIN, spec.LINK_PORT_MAX + 1):
        if port not in held:
            found.append(port)
            if len(found) == count:
                return tuple(found)
    raise SpecError(f"no free link port left in {spec.LINK_PORT_MIN}-{spec.LINK_PORT_MAX}",
                    "remove links that are no longer needed")


def add_link(cluster: spec.ClusterSpec, a: tuple[int, int], b: tuple[int, int], configs: Mapping[int, VmConfig],
             mtu: int, macs: Sequence[str | None] = (), candidates: Iterable[str] = ()) -> spec.ClusterSpec:
    """Declare the link a - b (ends as (vmid, index)): each end's netN must be free in its VM
    config and undeclared, as for a vhost-user NIC. `macs`: the MAC of each end, or None for
    the first of `candidates` no NIC of the cluster or of these VMs has."""
    if a == b:
        raise SpecError(f"a link needs two different NICs, got {names.end_name(*a)} twice", "name two ends")
    for vmid, index in (a, b):
        _must_be_free(cluster, vmid, index, configs[vmid])
    taken = [n.mac for n in (*cluster.nics, *cluster.links)]
    taken += [device.mac for vmid in {a[0], b[0]} for _line, device in vm_nets(configs[vmid]).values() if device.mac]
    chosen = []
    candidates = iter(candidates)
    for wanted in (list(macs) + [None, None])[:2]:
        mac = spec.check_mac(wanted) if wanted else spec.unused_mac(candidates, taken)
        if mac in {m.upper() for m in taken}:
            raise SpecError(f"MAC {mac} is already used by a NIC of the cluster or of these VMs",
                            "give another --mac, or leave it out to get a unique one")
        taken.append(mac)
        chosen.append(mac)
    port_a, port_b = free_ports(cluster, 2)
    ends = (spec.LinkEnd(a[0], a[1], chosen[0], port_a, b, port_b, mtu),
            spec.LinkEnd(b[0], b[1], chosen[1], port_b, a, port_a, mtu))
    return cluster.with_entry(ends[0]).with_entry(ends[1])


def remove_link(cluster: spec.ClusterSpec, end: tuple[int, int]) -> spec.ClusterSpec:
    """Remove the link one of whose ends is `end` (both ends, or what is left of it)."""
    found = cluster.entry(*end)
    if not isinstance(found, spec.LinkEnd):
        raise NotFound(f"{names.end_name(*end)} is not the end of a link",
                       "see the links with `pve-vhost-agent link list`")
    rest = cluster.without(*end)
    peer = rest.entry(*found.peer)
    if isinstance(peer, spec.LinkEnd) and peer.peer == end:
        rest = rest.without(*found.peer)
    return rest


def _must_be_free(cluster: spec.ClusterSpec, vmid: int, index: int, config: VmConfig) -> None:
    end = names.end_name(vmid, index)
    nets = vm_nets(config)
    if index in nets:
        raise ConfigConflict(f"VM {vmid} already has `{nets[index][0]}` in its config",
                             f"pick a free netN for the link end {end}")
    entry = cluster.entry(vmid, index)
    if isinstance(entry, spec.LinkEnd):
        raise ConfigConflict(f"{end} is already linked to {entry.peer_end}",
                             f"remove that link first (pve-vhost-agent link remove {end}), or pick another netN")
    if entry is not None:
        what = "a vhost-user NIC" if isinstance(entry, spec.VhostNic) else "QinQ on Proxmox's tap NIC"
        raise ConfigConflict(f"VM {vmid} {entry.name} is already declared as {what}", "pick another netN for the link end")


# --- what is observed -----------------------------------------------------------------


def wanted_sockets(ends: Sequence[spec.LinkEnd], facts: LinkFacts) -> dict[int, "EndSocket | str"]:
    return {end.index: end_socket(end, facts.here, facts.nodes.get(end.peer[0]), facts.addresses) for end in ends}


def start_notes(ends: Sequence[spec.LinkEnd], facts: LinkFacts) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(notes, warnings) of a start about its link ends: where each will point (its socket
    comes after QEMU starts, the peer need not run), and whether the underlay carries it."""
    notes, warnings = [], []
    for end in sorted(ends, key=lambda e: e.index):
        want = end_socket(end, facts.here, facts.nodes.get(end.peer[0]), facts.addresses)
        if isinstance(want, str):
            warnings.append(f"VM {end.vmid} {end.name}: the link to {end.peer_end} stays dark: {want}")
            continue
        where = "this node" if want.peer_node == facts.here else f"node {want.peer_node}"
        notes.append(f"link {end.name} to {end.peer_end} on {where}: UDP {_text(want.local)} -> {_text(want.remote)} "
                     "once QEMU runs")
        if want.peer_node != facts.here:
            device, mtu = facts.underlay
            warning = underlay_warning(end, want.local[0], device, mtu)
            if warning:
                warnings.append(warning)
    return tuple(notes), tuple(warnings)


def _text(address: Address) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


# --- where a running end points -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EndSocket:
    """Where a running end's socket must be: bound to `local`, connected to `remote`."""

    local: Address
    remote: Address
    peer_node: str


def has_link_devices(args_line: str) -> bool:
    """Do these args (say the ones a VM runs with) give it link end devices?"""
    if "hubport" not in args_line:
        return False
    try:
        words = qemuargs.agent_args(args_line)
    except AgentError:
        return False
    return any("type=hubport" in word for word in words)


def family(address: str) -> int:
    return ipaddress.ip_address(address).version


def end_socket(end: spec.LinkEnd, here: str, peer_node: str | None, addresses: Mapping[str, str]) -> EndSocket | str:
    """Where `end`, running on node `here`, must point; or why it cannot (a dark link)."""
    if peer_node is None:
        return f"VM {end.peer[0]} has no config on any node"
    if peer_node == here:
        return EndSocket((LOOPBACK, end.port), (LOOPBACK, end.peer_port), peer_node)
    for node in (here, peer_node):
        if node not in addresses:
            return f"node {node} has no ring0_addr in corosync.conf"
    local, remote = addresses[here], addresses[peer_node]
    if family(local) != family(remote):
        return f"node {here} ({local}) and node {peer_node} ({remote}) have addresses of different IP versions"
    return EndSocket((local, end.port), (remote, end.peer_port), peer_node)


@dataclasses.dataclass(frozen=True)
class LinkPlan:
    """What a running QEMU's link ends need now, and what they wait for."""

    actions: tuple[Action, ...] = ()
    waiting: tuple[str, ...] = ()  # ends the running QEMU has no device for: at its next start
    dark: tuple[str, ...] = ()  # ends that cannot point anywhere (a problem to fix)


def plan_link_sockets(vmid: int, ends: Sequence[spec.LinkEnd], wanted: Mapping[int, EndSocket | str],
                      running: RunningLinks) -> LinkPlan:
    """What a running QEMU's link sockets need. `running.devices`: the ends whose hub QEMU
    has (its args had them when it started); `running.attached`: the sockets it has."""
    actions: list[Action] = []
    waiting, dark = [], []
    by_index: dict[int, list[Attached]] = {}
    for socket in running.attached:
        by_index.setdefault(socket.index, []).append(socket)
    declared = {end.index: end for end in ends}
    for index in sorted(set(by_index) - set(declared)):
        netdevs = tuple(n for s in by_index[index] for n in s.netdevs)
        actions.append(DisconnectLink(vmid, names.nic_name(index), netdevs, "no link is declared on it any more"))
    for end in sorted(ends, key=lambda e: e.index):
        have = by_index.get(end.index, [])
        want = wanted.get(end.index, "its peer's node is not known")
        if end.index not in running.devices:
            waiting.append(f"VM {vmid} {end.name}: the link to {end.peer_end} waits for the VM's next start "
                           "(its running QEMU has no such device)")
            continue
        if isinstance(want, str):
            if have:
                actions.append(DisconnectLink(vmid, end.name, tuple(n for s in have for n in s.netdevs),
                                              f"the link to {end.peer_end} is dark: {want}"))
            dark.append(f"VM {vmid} {end.name}: the link to {end.peer_end} is dark: {want}")
            continue
        if len(have) == 1 and (have[0].local, have[0].remote) == (want.local, want.remote):
            continue
        actions.append(ConnectLink(vmid, end.name, want.local, want.remote, end.peer_end, want.peer_node,
                                   tuple(n for s in have for n in s.netdevs)))
    return LinkPlan(tuple(actions), tuple(waiting), tuple(dark))


def connected_ends(ends: Sequence[spec.LinkEnd], wanted: Mapping[int, EndSocket | str],
                   running: RunningLinks) -> tuple[spec.LinkEnd, ...]:
    """The ends whose one socket points where it must (what `status` counts as connected)."""
    return tuple(end for end in ends if isinstance(want := wanted.get(end.index), EndSocket)
                 and [(s.local, s.remote) for s in running.attached if s.index == end.index] == [(want.local, want.remote)])


# --- the underlay ---------------------------------------------------------------------


def underlay_warning(end: spec.LinkEnd, address: str, device: str | None, mtu: int | None) -> str | None:
    """A warning when the interface carrying this node's cluster `address` cannot take the
    end's frames in one datagram (None: it can, or the end talks over loopback)."""
    shortfall = underlay_shortfall(end, address, device, mtu)
    return None if shortfall is None else f"VM {end.vmid} {end.name}: {shortfall[0]}; {shortfall[1]}"


def underlay_shortfall(end: spec.LinkEnd, address: str, device: str | None, mtu: int | None) -> tuple[str, str] | None:
    """(problem, fix) when `device` (MTU `mtu`, holding this node's cluster `address`;
    None: no interface holds it) cannot carry the end's guest frames whole; else None."""
    overhead = spec.LINK_OVERHEAD[family(address)]
    needed = end.mtu + overhead
    if mtu is None:
        return (f"no interface of this node has its cluster address {address}, so the link to {end.peer_end} "
                "may not reach its peer", "check ring0_addr in /etc/pve/corosync.conf")
    if mtu >= needed:
        return None
    fits = mtu - overhead
    return (f"the link to {end.peer_end} has guest MTU {end.mtu}, which needs an underlay MTU of {needed} "
            f"(IPv{family(address)}: {overhead} bytes of tunnel), but {device} has {mtu}: larger frames are "
            f"fragmented (slow)", f"raise {device}'s MTU to {needed}, or re-add the link with --mtu {fits}")
