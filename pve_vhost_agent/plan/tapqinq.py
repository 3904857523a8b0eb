"""Can QinQ on Proxmox's own tap NICs hold, and do the bridge's uplinks carry its frames?

Pure: the VM's spec, its config, the observed OVS state and links in; an error or
warnings out. Used by `qinq set` (the NIC rule), the pre-start hook (abort the start)
and the post-start hook (warn about uplink MTUs).

Why the NIC must carry `tag=<S-tag>`: pve-bridge plugs `tap<vmid>i<N>` with the NIC's
`tag=`/`trunks=` after pre-start, and only post-start makes it a dot1q-tunnel port. A
port without a tag is a trunk of every VLAN in OVS, so whenever post-start fails (or in
the seconds after Proxmox re-plugs the tap) the guest would reach every VLAN of the
provider bridge. With `tag=<S-tag>` it is an access port of the S-VLAN meanwhile:
untagged guest frames stay in the S-VLAN and tagged ones are dropped (fail closed).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from pve_vhost_agent.plan import ovs as ovsplan
from pve_vhost_agent.errors import ConfigConflict, NotFound
from pve_vhost_agent.model.host import Link
from pve_vhost_agent.model.ovs import OvsPort, OvsState, PortVlan
from pve_vhost_agent.model.spec import TapQinQ, VmSpec
from pve_vhost_agent.formats.vmlayout import parse_net
from pve_vhost_agent.model.names import is_guest_device, tap_device

QINQ_HEADER = 4  # bytes the S-tag adds to every frame on the uplink
_NOT_UPLINK_KINDS = ("tun", "openvswitch", "bridge")
_KERNEL_IFACE_TYPES = ("", "system")  # OVS interface types backed by a kernel link


def check_nic(vmid: int, index: int, value: str, stag: int) -> None:
    """Raise unless `netN: value` lets pve-bridge plug the tap as an access port of `stag`."""
    device = parse_net(index, value)
    line = f"net{index}: {value}"
    fixed = fixed_net_value(value, stag)
    if not device.bridge:
        raise ConfigConflict(f"VM {vmid} `{line}` has no bridge",
                             f"attach it to an OVS bridge: `qm set {vmid} --net{index} {fixed},bridge=<OVS bridge>`")
    if device.firewall:
        # With the firewall on, a fwbr/fwln pair sits between tap and OVS bridge: the OVS
        # port is Proxmox's fwln veth, not the tap, and Proxmox re-creates it at will.
        raise ConfigConflict(
            f"VM {vmid} `{line}` has firewall=1, so its OVS port is Proxmox's firewall veth, not {tap_device(vmid, index)}",
            f"turn the firewall off on net{index} for QinQ: `qm set {vmid} --net{index} {fixed}`",
        )
    if device.tag != stag or device.trunks:
        raise ConfigConflict(
            f"VM {vmid} `{line}` needs tag={stag} (the S-tag) and no trunks: pve-bridge plugs "
            f"{tap_device(vmid, index)} with them before post-start makes it QinQ, and untagged it would carry every VLAN",
            f"run `qm set {vmid} --net{index} {fixed}`",
        )


def fixed_net_value(value: str, stag: int) -> str:
    """`value` with tag=<stag>, without trunks and without the firewall (Proxmox's default: off)."""
    keep = [item for item in value.split(",") if item and item.partition("=")[0].strip() not in ("tag", "trunks", "firewall")]
    return ",".join([*keep, f"tag={stag}"])


def check_before_start(vm: VmSpec, config: Mapping[str, str], state: OvsState) -> None:
    """Pre-start: raise (abort the start) unless post-start can make every tap QinQ.

    `config` is the VM config this start uses. The NIC must still carry its S-tag with
    the firewall off, its bridge must be an OVS bridge, and Open vSwitch must allow two
    VLAN headers there (ovsplan's vlan-limit rule, asked about the tap pve-bridge is
    about to plug).
    """
    plugged = []
    for entry in vm.tap_qinq:
        value = config.get(entry.name)
        if value is None:
            raise NotFound(f"VM {vm.vmid} has no {entry.name} in its config, but QinQ is declared for it",
                           f"add it (`qm set {vm.vmid} --{entry.name} virtio,bridge=<OVS bridge>,tag={entry.qinq.stag}`) "
                           f"or drop the QinQ (`pve-vhost-agent qinq remove {vm.vmid} {entry.name}`)")
        check_nic(vm.vmid, entry.index, value, entry.qinq.stag)
        bridge = parse_net(entry.index, value).bridge
        if state.bridge(bridge) is None:
            raise NotFound(f"VM {vm.vmid} {entry.name}: Open vSwitch has no bridge {bridge}, so {entry.port_name} "
                           f"cannot become a QinQ port",
                           f"put {entry.name} on an OVS bridge, or create it (ovs-vsctl add-br {bridge})")
        plugged.append(OvsPort(entry.port_name, bridge, PortVlan(tag=entry.qinq.stag)))
    if plugged:
        names = {p.name for p in plugged}
        ahead = dataclasses.replace(state, ports=tuple(p for p in state.ports if p.name not in names) + tuple(plugged))
        ovsplan.plan_tap_qinq(VmSpec(vm.vmid, (), vm.tap_qinq), ahead)  # raises what post-start would


@dataclasses.dataclass(frozen=True)
class LinkWarning:
    """Something about a QinQ tap's links the operator should fix (post-start only warns)."""

    nic: str
    port: str
    link: str
    text: str


def link_warnings(vm: VmSpec, state: OvsState, links: Mapping[str, Link]) -> tuple[LinkWarning, ...]:
    """Post-start: each QinQ tap must be up, and its bridge's kernel uplinks (NICs, bonds
    and their slaves) must take its MTU plus the S-tag, or full-size frames are lost."""
    warnings: list[LinkWarning] = []
    for entry in vm.tap_qinq:
        port = state.port(entry.port_name)
        tap = links.get(entry.port_name)
        if port is None or not port.bridge or tap is None:
            warnings.append(_warn(entry, entry.port_name, f"{entry.port_name} is missing from OVS or the kernel",
                                  f"is VM {vm.vmid} running with {entry.name} on an OVS bridge?"))
            continue
        if not tap.up:
            warnings.append(_warn(entry, tap.name, f"{tap.name} is down",
                                  "pve-bridge brings it up when QEMU starts: see the start's task log"))
        need = tap.mtu + QINQ_HEADER
        for link, fix_on in _uplinks(state, port.bridge, links):
            if link.mtu < need:
                warnings.append(_warn(
                    entry, link.name,
                    f"uplink {link.name} of bridge {port.bridge} has MTU {link.mtu}, but QinQ frames from "
                    f"{tap.name} (MTU {tap.mtu}) need {need} with the S-tag: full-size frames are dropped",
                    f"set `mtu {need}` on {fix_on} in /etc/network/interfaces, then `ifreload -a`"))
    return tuple(warnings)


def _uplinks(state: OvsState, bridge: str, links: Mapping[str, Link]) -> list[tuple[Link, str]]:
    """(link, where its MTU is set) for the kernel uplinks of `bridge`: a bond's slaves
    take their MTU from the bond."""
    found = []
    for port in state.ports:
        if port.bridge != bridge:
            continue
        for iface in port.interfaces:
            link = links.get(iface.name)
            if iface.type not in _KERNEL_IFACE_TYPES or link is None or not is_uplink(link):
                continue
            found.append((link, link.name))
            if link.kind == "bond":
                found += [(s, link.name) for s in links.values() if s.master == link.index]
    return found


def is_uplink(link: Link) -> bool:
    """A kernel link that can carry a bridge's traffic off the host (not a guest's tap, a bridge or OVS)."""
    return link.kind not in _NOT_UPLINK_KINDS and not is_guest_device(link.name)


def _warn(entry: TapQinQ, link: str, problem: str, fix: str) -> LinkWarning:
    return LinkWarning(entry.name, entry.port_name, link, f"VM {entry.vmid} {entry.name}: {problem}; {fix}")
