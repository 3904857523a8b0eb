"""QinQ on Proxmox's tap NICs of Linux bridges: the kernel devices that make it, and when
it cannot hold. Pure: the VM's spec, its config and the observed links in; actions or a
refusal out. The same rule as on Open vSwitch holds first (plan/tapqinq.check_nic: the
NIC carries tag=<S-tag>, no trunks, firewall off), so until post-start (or if it fails)
pve-bridge's own plug keeps the tap an access port of VLAN S: it fails closed.

What post-start makes of the tap depends on the S-tag's TPID and the bridge; no setting
of Proxmox's bridge changes (a bridge-wide vlan_protocol would change every VM's VLANs):

- traditional bridge, 802.1Q S-tag: pve-bridge plugged the tap into `<bridge>v<S>`, whose
  port `<uplink>.<S>` pushes 8100/S onto whatever the guest sends, C-tags included, and
  pops it on the way in: that already is a dot1q tunnel. The tap stays there.
- the S-tag's TPID is not the one the bridge tags its VLANs with (802.1ad on a
  traditional or an 802.1Q VLAN-aware bridge, 802.1Q on an 802.1ad one): an S-VLAN
  device (that TPID, id S) on the bridge's uplink takes the uplink's S-tagged frames
  before the bridge sees them and tags what it sends; an S-VLAN bridge joins it to the
  QinQ taps, which leave Proxmox's bridge. `<uplink>.<S>` (802.1Q), which Proxmox makes
  for tag=S NICs on traditional bridges, is another device and stays theirs.
- the same TPID on a VLAN-aware bridge: the S-VLAN is the bridge's own VLAN S (other
  tag=S NICs share it), so the outer tag must be on the frame before the bridge sees it:
  a veth end is a tagged member of VLAN S in the bridge, and the S-VLAN device sits on
  its peer. (A tc `vlan push` on the tap was tried on Debian's 6.1 kernel: the bridge
  then forwards C-tagged frames 4 bytes off their start, so it is not used.)

C-VLANs (`cvlans`) are tc filters on the tap, both ways, as OVS's dot1q-tunnel applies
them: listed 802.1Q C-VLANs pass, untagged frames and the rest are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

from pve_vhost_agent.errors import ConfigConflict, NetworkRefused, NotFound
from pve_vhost_agent.formats.vmlayout import parse_net, parse_property_string
from pve_vhost_agent.model.actions import Action
from pve_vhost_agent.model.lbactions import AddSVlanBridge, DelSVlanBridge, RestoreLinuxTap, SetLinuxTapQinQ
from pve_vhost_agent.model.netdevs import (
    DEVICE_ROLES, ROLE_PEER, ROLE_SBRIDGE, ROLE_SVLAN, ROLE_TAP, ROLE_TRUNK, TPID, BridgeVlan, LinkInfo, LinkMark,
    LinkState, Placement, SVlanBridge, filter_rules, svlan_key,
)
from pve_vhost_agent.model.names import MAX_IFNAME, is_firewall_bridge, is_guest_device, pve_vlan_bridge
from pve_vhost_agent.model.spec import EtherType, TapQinQ, VmSpec
from pve_vhost_agent.plan.tapqinq import QINQ_HEADER, check_nic

_NOT_UPLINK_KINDS = ("tun", "bridge", "openvswitch")
SVlanKey = tuple[str, int, EtherType]


@dataclasses.dataclass(frozen=True)
class Tunnel:
    """How one QinQ tap reaches its S-VLAN."""

    entry: TapQinQ
    bridge: LinkInfo  # the NIC's bridge (Proxmox's)
    master: str  # where the tap is plugged for QinQ
    svlan: SVlanBridge | None  # what the agent makes (None: Proxmox's `<bridge>v<S>` serves)


def linux_taps(vm: VmSpec, config: Mapping[str, str], links: LinkState | None) -> tuple[TapQinQ, ...]:
    """The VM's QinQ taps whose NIC (in `config`) is on a Linux bridge of this host; the
    others are Open vSwitch's (plan/tapqinq, plan/ovs)."""
    if links is None:
        return ()
    found = []
    for entry in vm.tap_qinq:
        value = config.get(entry.name)
        bridge = links.get(parse_net(entry.index, value).bridge) if value is not None else None
        if bridge is not None and bridge.is_bridge:
            found.append(entry)
    return tuple(found)


def without_taps(vm: VmSpec, entries: Iterable[TapQinQ]) -> VmSpec:
    """`vm` without these QinQ taps (what is left for Open vSwitch)."""
    drop = set(entries)
    return dataclasses.replace(vm, tap_qinq=tuple(e for e in vm.tap_qinq if e not in drop))


def tunnel(vmid: int, entry: TapQinQ, value: str, links: LinkState) -> Tunnel:
    """The devices QinQ on this tap needs (see the module's note), or why it cannot hold."""
    bridge = links.get(parse_net(entry.index, value).bridge)
    if bridge is None or not bridge.is_bridge:
        raise NotFound(f"VM {vmid} {entry.name}: the host has no Linux bridge {parse_net(entry.index, value).bridge}",
                       "create it in /etc/network/interfaces (ifreload -a) or attach the NIC to another bridge")
    qinq = entry.qinq
    if not bridge.vlan_filtering and qinq.ethertype is EtherType.DOT1Q:
        return Tunnel(entry, bridge, pve_vlan_bridge(bridge.name, qinq.stag), None)
    through = bridge.vlan_filtering and bridge.bridge_vlan_protocol == TPID[qinq.ethertype]
    uplinks = uplinks_of(bridge, links)
    if not uplinks:
        raise NetworkRefused(f"VM {vmid} {entry.name}: bridge {bridge.name} has no uplink (a NIC, bond, VLAN "
                             f"device or veth among its ports), so S-VLAN {qinq.stag} would reach nothing",
                             f"add the uplink to {bridge.name}'s bridge-ports, or put {entry.name} on a bridge that has one")
    if not through and len(uplinks) > 1:
        raise NetworkRefused(f"VM {vmid} {entry.name}: bridge {bridge.name} has several uplinks "
                             f"({', '.join(u.name for u in uplinks)}), and the S-VLAN device needs exactly one",
                             f"bond them into one uplink of {bridge.name}")
    svlan = SVlanBridge(bridge.name, qinq.stag, qinq.ethertype, uplinks[0].name, through,
                        min(u.mtu for u in uplinks))
    if through:
        svlan = dataclasses.replace(svlan, lower=svlan.name(ROLE_PEER))
    longest = max((svlan.name(role) for role in svlan.roles), key=len)
    if len(longest) > MAX_IFNAME:
        raise NetworkRefused(f"VM {vmid} {entry.name}: the agent's device {longest} for S-VLAN {qinq.stag} of "
                             f"{bridge.name} would be longer than {MAX_IFNAME} characters",
                             f"use a bridge with a name of at most {len(bridge.name) - len(longest) + MAX_IFNAME} "
                             "characters (Proxmox's vmbrN are)")
    return Tunnel(entry, bridge, svlan.name(), svlan)


def uplinks_of(bridge: LinkInfo, links: LinkState) -> tuple[LinkInfo, ...]:
    """The ports of `bridge` that carry its traffic off the host: not a guest's tap or
    veth, not a bridge, not one of the agent's devices."""
    return tuple(sorted((port for port in links.ports(bridge) if port.kind not in _NOT_UPLINK_KINDS
                         and not is_guest_device(port.name) and port.mark is None), key=lambda p: p.name))


def check_before_start(vmid: int, entries: Iterable[TapQinQ], config: Mapping[str, str], links: LinkState) -> None:
    """Pre-start: raise (abort the start) unless post-start can make every one of these
    taps a QinQ port: the NIC rule, an uplink whose MTU takes the tap's (pve-bridge gives
    the tap its bridge's MTU) plus the S-tag, and names and VLANs nobody else has."""
    for entry in entries:
        value = config[entry.name]
        check_nic(vmid, entry.index, value, entry.qinq.stag)
        if entry.qinq.cvlans and parse_property_string(value).get("rate"):
            raise ConfigConflict(
                f"VM {vmid} {entry.name} has a rate limit, whose tc ingress qdisc on {entry.port_name} leaves no "
                "room for the C-VLAN filters", f"drop rate= from {entry.name}, or the C-VLANs from the QinQ")
        found = tunnel(vmid, entry, value, links)
        need = found.bridge.mtu + QINQ_HEADER
        for uplink in uplinks_of(found.bridge, links):
            if uplink.mtu < need:
                raise NetworkRefused(
                    f"VM {vmid} {entry.name}: uplink {uplink.name} of {found.bridge.name} has MTU {uplink.mtu}, but "
                    f"QinQ frames from {entry.port_name} (MTU {found.bridge.mtu}, its bridge's) need {need} with the S-tag",
                    f"set `mtu {need}` (or more) on {uplink.name} and keep {found.bridge.name} at `mtu "
                    f"{found.bridge.mtu}` in /etc/network/interfaces, then `ifreload -a`")
        if found.svlan is not None:
            _check_devices(vmid, entry, found.svlan, links)


def _check_devices(vmid: int, entry: TapQinQ, svlan: SVlanBridge, links: LinkState) -> None:
    """Refuse names and VLAN slots of someone else's (the kernel would refuse a second
    VLAN device with the same TPID and id on one lower device)."""
    for role in svlan.roles:
        link = links.get(svlan.name(role))
        if link is not None and link.mark != svlan.mark(role):
            raise NetworkRefused(f"VM {vmid} {entry.name}: {link.name}, the name of the agent's {role} device for "
                                 f"S-VLAN {svlan.stag} of {svlan.bridge}, is taken by a device that is not the agent's",
                                 f"rename or remove {link.name}")
    lower = links.get(svlan.lower)
    tpid = TPID[svlan.ethertype]
    for link in links.links:
        if (lower is not None and link.lower == lower.index and link.kind == "vlan" and link.vlan_id == svlan.stag
                and link.vlan_protocol == tpid and link.name != svlan.name(ROLE_SVLAN)):
            raise NetworkRefused(f"VM {vmid} {entry.name}: {lower.name} already has VLAN device {link.name} for "
                                 f"{svlan.ethertype.value} VLAN {svlan.stag}, and the kernel takes one per VLAN",
                                 f"remove {link.name}, or give {entry.name} another S-tag")


def plan_taps(vmid: int, entries: Iterable[TapQinQ], config: Mapping[str, str],
              links: LinkState) -> tuple[Action, ...]:
    """Post-start and the service: each QinQ tap of a running VM on a Linux bridge as its
    tunnel needs it (the devices, then the tap); marked taps of the VM that are no longer
    declared get Proxmox's placement back. Nothing when all is in place."""
    actions: list[Action] = []
    planned: set[SVlanKey] = set()
    wanted = set()
    for entry in entries:
        value = config.get(entry.name)
        if value is None:
            raise NotFound(f"VM {vmid} has no {entry.name} in its config, but QinQ is declared for it",
                           f"drop the QinQ (`pve-vhost-agent qinq remove {vmid} {entry.name}`)")
        found = tunnel(vmid, entry, value, links)
        tap = links.get(entry.port_name)
        if tap is None:
            raise NotFound(f"VM {vmid} {entry.name}: the host has no {entry.port_name}",
                           f"is VM {vmid} running with {entry.name}?")
        master = links.master_of(tap)
        if master is not None and is_firewall_bridge(master.name):
            raise ConfigConflict(f"VM {vmid} {entry.name}: {entry.port_name} sits behind Proxmox's firewall bridge "
                                 f"{master.name}", f"turn the firewall off on {entry.name} (firewall=0)")
        if found.svlan is not None and found.svlan.key not in planned:
            _check_devices(vmid, entry, found.svlan, links)
            planned.add(found.svlan.key)
            if not svlan_in_place(found.svlan, links):
                actions.append(AddSVlanBridge(found.svlan))
        wanted.add(tap.name)
        action = _tap_action(vmid, entry, found, tap, links, parse_net(entry.index, value).tag)
        if action is not None:
            actions.append(action)
    for link in links.marked(ROLE_TAP):
        if link.mark.vmid == vmid and link.name not in wanted:
            actions.append(RestoreLinuxTap(link.name, _saved(link, links), vmid, "its QinQ is no longer declared"))
    return tuple(actions)


def _tap_action(vmid: int, entry: TapQinQ, found: Tunnel, tap: LinkInfo, links: LinkState,
                tag: int | None) -> SetLinuxTapQinQ | None:
    current = links.placement(tap)
    target = Placement(found.master)
    master = links.master_of(tap)
    mark = tap.mark if tap.mark and tap.mark.role == ROLE_TAP and tap.mark.vmid == vmid else None
    in_proxmox = master is not None and master.mark is None  # pve-bridge's doing (a start, a re-plug)
    if in_proxmox and (current != target or mark is None or mark.saved is None):
        saved = current
    else:  # in the agent's S-VLAN bridge, or between Proxmox's unplug and plug
        saved = mark.saved if mark and mark.saved is not None else _proxmox_placement(found.bridge, tag)
    qinq = entry.qinq
    wanted_mark = LinkMark(ROLE_TAP, found.bridge.name, qinq.stag, qinq.ethertype, vmid, entry.name, qinq.cvlans,
                           found.master, saved)
    filters = {(r.direction, r.pref, r.kind) for r in filter_rules(qinq.cvlans)}
    if tap.mark == wanted_mark and current == target and {(f.direction, f.pref, f.kind) for f in tap.filters} == filters:
        return None
    return SetLinuxTapQinQ(tap.name, vmid, entry.name, found.bridge.name, qinq, found.master, saved)


def _proxmox_placement(bridge: LinkInfo, tag: int | None) -> Placement:
    """Where pve-bridge plugs a NIC with tag=`tag` (no trunks) on `bridge`."""
    if tag is None:
        return Placement(bridge.name, (BridgeVlan(1, True, True),) if bridge.vlan_filtering else ())
    if bridge.vlan_filtering:
        return Placement(bridge.name, (BridgeVlan(tag, True, True),))
    return Placement(pve_vlan_bridge(bridge.name, tag))


def _saved(tap: LinkInfo, links: LinkState) -> Placement:
    if tap.mark.saved is not None:
        return tap.mark.saved
    bridge = links.get(tap.mark.bridge)
    return _proxmox_placement(bridge, tap.mark.stag) if bridge else Placement()


def svlan_in_place(svlan: SVlanBridge, links: LinkState) -> bool:
    """Every device of `svlan` exists, is the agent's, up, and joined as it should be."""
    devices = {role: links.get(svlan.name(role)) for role in svlan.roles}
    if any(link is None or link.mark != svlan.mark(role) or not link.up for role, link in devices.items()):
        return False
    sbridge, device = devices[ROLE_SBRIDGE], devices[ROLE_SVLAN]
    lower = links.get(svlan.lower)
    if (device.master != sbridge.index or lower is None or device.lower != lower.index
            or (device.vlan_id, device.vlan_protocol) != (svlan.stag, TPID[svlan.ethertype])):
        return False
    if svlan.through_bridge:
        trunk, bridge = devices[ROLE_TRUNK], links.get(svlan.bridge)
        return (bridge is not None and trunk.master == bridge.index and trunk.lower == devices[ROLE_PEER].index
                and trunk.vlans == (BridgeVlan(svlan.stag),))
    return True


def plan_cleanup(links: LinkState, gone: Callable[[int], bool], needed: Iterable[SVlanKey] = (),
                 only: Iterable[SVlanKey] | None = None, reason: str = "") -> tuple[Action, ...]:
    """Give back the marked taps of the VMs `gone` says no longer run here, and remove the
    agent's S-VLAN devices no other QinQ tap uses and no running VM needs (`needed`);
    with `only`, just those S-VLANs (a VM's post-stop removes its own)."""
    actions: list[Action] = []
    used = set(needed)
    for tap in links.marked(ROLE_TAP):
        if gone(tap.mark.vmid):
            actions.append(RestoreLinuxTap(tap.name, _saved(tap, links), tap.mark.vmid, reason))
        else:
            used.add(svlan_key(tap.mark))
    devices: dict[SVlanKey, list[LinkInfo]] = {}
    for link in links.links:
        if link.mark is not None and link.mark.role in DEVICE_ROLES:
            devices.setdefault(svlan_key(link.mark), []).append(link)
    chosen = set(only) if only is not None else None
    for key, found in sorted(devices.items(), key=lambda item: (item[0][0], item[0][1], item[0][2].value)):
        if key in used or (chosen is not None and key not in chosen):
            continue
        order = {role: n for n, role in enumerate((ROLE_SVLAN, ROLE_TRUNK, ROLE_PEER, ROLE_SBRIDGE))}
        names = tuple(link.name for link in sorted(found, key=lambda link: order[link.mark.role]))
        actions.append(DelSVlanBridge(key[0], key[1], key[2].value, names, reason))
    return tuple(actions)


def svlan_keys(vm: VmSpec, config: Mapping[str, str]) -> tuple[SVlanKey, ...]:
    """The S-VLANs the VM's QinQ taps use by its config (bridge, S-tag, TPID), whatever the bridge."""
    keys = []
    for entry in vm.tap_qinq:
        value = config.get(entry.name)
        if value is not None:
            keys.append((parse_net(entry.index, value).bridge, entry.qinq.stag, entry.qinq.ethertype))
    return tuple(keys)
