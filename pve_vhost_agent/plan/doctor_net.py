"""The doctor's network checks: /etc/network/interfaces against the running kernel, MTU
chains, bonds, bridges and NAT bridges. Pure: the parsed file, the kernel's links and
this node's VM configs in, findings out.

Severity: `error` where frames are lost now (a missing interface, an MTU step down, a
bond with no working slave or no LACP partner, a VM tag its bridge does not carry, NAT
without forwarding); `warning` where it works but is fragile or not what the file says
(drift, a slave down, miimon 0, STP delays).
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Sequence

from pve_vhost_agent.formats.vmlayout import net_devices
from pve_vhost_agent.model.findings import Finding, Severity
from pve_vhost_agent.model.hostnet import DOT1Q, IP_FORWARD, LACP, HostLink, HostNet, IfaceStanza, NetworkFile
from pve_vhost_agent.model.names import is_guest_device
from pve_vhost_agent.model.spec import format_vlan_list
from pve_vhost_agent.plan.observed import LocalVm
from pve_vhost_agent.plan.tapqinq import QINQ_HEADER, is_uplink

INTERFACES = "/etc/network/interfaces"
RELOAD = "then `ifreload -a`"
# Devices Proxmox makes by itself: VM taps, veths and firewall links (is_guest_device), the
# firewall bridges `fwbr<vmid>i<N>`, and for a tagged NIC on a bridge that is not
# VLAN-aware, the bridge `<bridge>v<tag>` with its VLAN device.
_FIREWALL_BRIDGE = re.compile(r"fwbr[0-9]+i[0-9]+")
_VLAN_BRIDGE = re.compile(r"(?P<bridge>.+)v(?P<tag>[0-9]+)")
_MANAGED_KINDS = ("bond", "bridge", "vlan")
_HASHED_MODES = (LACP, "balance-xor", "balance-tlb", "balance-alb")
STP_DELAY_LIMIT = 2.0  # seconds of forward delay beyond which a new port stalls noticeably
_MASQUERADE = re.compile(r"masquerade", re.IGNORECASE)


def findings(nf: NetworkFile | None, net: HostNet | None, net_problem: str,
             vms: Sequence[LocalVm]) -> list[Finding]:
    found = list(_file_findings(nf))
    if net is None:
        found.append(Finding(Severity.ERROR, "netlink", net_problem,
                             "run `pve-vhost-agent doctor` as root on the host", "netlink-unreadable"))
        return found
    if nf is not None:
        found += drift(nf, net)
        found += nat(nf, net)
    found += mtu_chain(net)
    found += bonds(net)
    found += bridges(net)
    found += vm_tags(vms, net, nf)
    return found


def _file_findings(nf: NetworkFile | None) -> Iterator[Finding]:
    if nf is None:
        yield Finding(Severity.INFO, INTERFACES, "does not exist, so the file-against-kernel checks are skipped",
                      "nothing to do unless ifupdown2 should manage this host's network", "interfaces-missing")
        return
    for problem in nf.problems:
        where, _, what = problem.partition(": ")
        yield Finding(Severity.WARNING, where.split(":", 1)[0], f"{where}: {what}",
                      "fix the line (`ifquery -a` shows how ifupdown2 reads the file)", "interfaces-syntax")


def is_proxmox_made(link: HostLink, net: HostNet) -> bool:
    """A device Proxmox creates and removes by itself, never in /etc/network/interfaces."""
    if is_guest_device(link.name) or _FIREWALL_BRIDGE.fullmatch(link.name):
        return True
    if link.kind == "bridge" and (m := _VLAN_BRIDGE.fullmatch(link.name)) and net.link(m["bridge"]):
        return True
    master = net.link(link.master) if link.master else None
    return link.kind == "vlan" and master is not None and bool(_VLAN_BRIDGE.fullmatch(master.name))


# --- file against kernel -----------------------------------------------------------------


def drift(nf: NetworkFile, net: HostNet) -> list[Finding]:
    found: list[Finding] = []
    needed = nf.depended_on()
    for stanza in nf.stanzas:
        if stanza.name == "lo" or stanza.ovs_type == "OVSBond":  # an OVS bond has no kernel link
            continue
        link = net.link(stanza.name)
        if link is None:
            found.append(_missing(stanza, needed))
            continue
        if stanza.ovs_type:
            continue  # Open vSwitch's: its bridges and ports are not kernel bridges and bonds
        if stanza.mtu is not None and link.mtu != stanza.mtu:
            found.append(_drift(stanza, "mtu", f"MTU {stanza.mtu}", f"MTU {link.mtu}"))
        if stanza.is_bond:
            found += _bond_drift(stanza, link, net)
        elif stanza.is_bridge:
            found += _bridge_drift(stanza, link, net)
        elif stanza.is_vlan:
            found += _vlan_drift(stanza, link)
    for link in net.links:
        if link.kind in _MANAGED_KINDS and nf.stanza(link.name) is None and not is_proxmox_made(link, net):
            found.append(Finding(
                Severity.WARNING, link.name,
                f"the kernel has {_kind_name(link.kind)} {link.name}, but /etc/network/interfaces does not declare it: "
                f"it is gone after a reboot or `ifreload -a`",
                f"declare it in {INTERFACES}, or remove it if it is a leftover", "drift-undeclared"))
    return found


def _missing(stanza: IfaceStanza, needed: frozenset[str]) -> Finding:
    if stanza.auto or stanza.name in needed:
        why = "auto" if stanza.auto else "needed by an auto interface"
        return Finding(Severity.ERROR, stanza.name,
                       f"{stanza.where} declares {stanza.name} ({why}), but the kernel has no such interface",
                       "run `ifreload -a` to create it; a renamed NIC (after a kernel, firmware or udev change) "
                       "needs its new name in the file (`ip -br link` lists them)", "drift-missing")
    return Finding(Severity.INFO, stanza.name, f"{stanza.where} declares {stanza.name}, which does not exist now",
                   "nothing to do unless it should (it is not auto)", "drift-missing")


def _drift(stanza: IfaceStanza, what: str, declared: str, running: str) -> Finding:
    return Finding(Severity.WARNING, stanza.name,
                   f"{stanza.where} declares {declared}, but the kernel runs {running}",
                   "run `ifreload -a` to apply the file, or change the file if the kernel is right", f"drift-{what}")


def _bond_drift(stanza: IfaceStanza, link: HostLink, net: HostNet) -> Iterator[Finding]:
    if link.bond is None:
        yield _drift(stanza, "kind", f"{stanza.name} as a bond", f"a {_kind_name(link.kind)}")
        return
    if stanza.bond_mode and stanza.bond_mode != link.bond.mode:
        yield _drift(stanza, "bond-mode", f"bond-mode {stanza.bond_mode}", f"bond-mode {link.bond.mode}")
    declared, running = set(stanza.bond_slaves or ()), {p.name for p in net.ports(link.name)}
    if declared != running:
        yield _drift(stanza, "bond-slaves", f"bond-slaves {' '.join(sorted(declared)) or 'none'}",
                     f"slaves {' '.join(sorted(running)) or 'none'}")
    if (stanza.bond_xmit_hash_policy and link.bond.mode in _HASHED_MODES
            and stanza.bond_xmit_hash_policy != link.bond.xmit_hash_policy):
        yield _drift(stanza, "bond-xmit-hash-policy", f"bond-xmit-hash-policy {stanza.bond_xmit_hash_policy}",
                     f"{link.bond.xmit_hash_policy}")
    if stanza.bond_miimon is not None and stanza.bond_miimon != link.bond.miimon:
        yield _drift(stanza, "bond-miimon", f"bond-miimon {stanza.bond_miimon}", f"miimon {link.bond.miimon}")


def _bridge_drift(stanza: IfaceStanza, link: HostLink, net: HostNet) -> Iterator[Finding]:
    if link.bridge is None:
        yield _drift(stanza, "kind", f"{stanza.name} as a bridge", f"a {_kind_name(link.kind)}")
        return
    declared = set(stanza.bridge_ports or ())
    running = {p.name for p in net.ports(link.name) if not is_proxmox_made(p, net)}
    if declared != running:
        yield _drift(stanza, "bridge-ports", f"bridge-ports {' '.join(sorted(declared)) or 'none'}",
                     f"ports {' '.join(sorted(running)) or 'none'}")
    aware = bool(stanza.bridge_vlan_aware)
    if aware != link.bridge.vlan_filtering:
        yield _drift(stanza, "bridge-vlan-aware", f"bridge-vlan-aware {_yes(aware)}",
                     f"VLAN filtering {'on' if link.bridge.vlan_filtering else 'off'}")
    if stanza.bridge_stp is not None and stanza.bridge_stp != link.bridge.stp:
        yield _drift(stanza, "bridge-stp", f"bridge-stp {'on' if stanza.bridge_stp else 'off'}",
                     f"STP {'on' if link.bridge.stp else 'off'}")
    if aware and stanza.bridge_vids is not None:
        for port in net.ports(link.name):
            if is_uplink(port) and not is_proxmox_made(port, net):
                missing = sorted(set(stanza.bridge_vids) - set(port.vids))
                if missing:
                    yield _drift(stanza, "bridge-vids", f"bridge-vids {format_vlan_list(stanza.bridge_vids)}",
                                 f"port {port.name} without VLANs {format_vlan_list(missing)}")


def _vlan_drift(stanza: IfaceStanza, link: HostLink) -> Iterator[Finding]:
    if link.vlan is None:
        yield _drift(stanza, "kind", f"{stanza.name} as a VLAN device", f"a {_kind_name(link.kind)}")
        return
    if stanza.vlan_id != link.vlan.vid:
        yield _drift(stanza, "vlan-id", f"VLAN {stanza.vlan_id}", f"VLAN {link.vlan.vid}")
    if stanza.vlan_raw_device and stanza.vlan_raw_device != link.lower:
        yield _drift(stanza, "vlan-raw-device", f"it on {stanza.vlan_raw_device}", f"it on {link.lower or '?'}")
    protocol = stanza.vlan_protocol or DOT1Q
    if protocol != link.vlan.protocol:
        yield _drift(stanza, "vlan-protocol", f"vlan-protocol {protocol}", f"{link.vlan.protocol}")


# --- MTU chains ----------------------------------------------------------------------------


def mtu_chain(net: HostNet) -> list[Finding]:
    """Bond slaves carry the bond's MTU; a bridge's uplinks at least the bridge's; a VLAN
    device no more than its lower device, and a double-tagged one 4 bytes less."""
    found: list[Finding] = []
    for link in net.links:
        if link.kind == "bond":
            for slave in net.ports(link.name):
                if slave.mtu != link.mtu:
                    found.append(Finding(
                        Severity.ERROR, slave.name,
                        f"MTU {slave.mtu} differs from its bond {link.name}'s MTU {link.mtu}: frames the bond sends "
                        f"through {slave.name} {'are dropped' if slave.mtu < link.mtu else 'are cut to the bond MTU'}",
                        f"set `mtu {link.mtu}` on {link.name} (ifupdown2 gives its slaves the same) and on "
                        f"{slave.name} in {INTERFACES}, {RELOAD}", "mtu-bond-slave"))
        elif link.kind == "bridge":
            for port in net.ports(link.name):
                if is_uplink(port) and not is_proxmox_made(port, net) and port.mtu < link.mtu:
                    found.append(Finding(
                        Severity.ERROR, link.name,
                        f"bridge MTU {link.mtu} is above the MTU {port.mtu} of its port {port.name}: frames larger "
                        f"than {port.mtu} bytes are dropped on their way out",
                        f"set `mtu {link.mtu}` on {port.name} in {INTERFACES} (or lower {link.name}'s), {RELOAD}",
                        "mtu-bridge-port"))
        elif link.kind == "vlan":
            found += _vlan_mtu(link, net)
    return found


def _vlan_mtu(link: HostLink, net: HostNet) -> Iterator[Finding]:
    lower = net.link(link.lower)
    if lower is None:
        return
    if link.mtu > lower.mtu:
        yield Finding(Severity.ERROR, link.name,
                      f"MTU {link.mtu} is above the MTU {lower.mtu} of {lower.name} below it: larger frames are dropped",
                      f"set `mtu {link.mtu}` on {lower.name} (or lower {link.name}'s) in {INTERFACES}, {RELOAD}",
                      "mtu-vlan")
    base = net.link(lower.lower) if lower.kind == "vlan" else None
    if base is not None and base.mtu < link.mtu + QINQ_HEADER:
        yield Finding(Severity.WARNING, link.name,
                      f"VLAN device on VLAN device {lower.name}: its frames leave {base.name} with two tags, "
                      f"which needs MTU {link.mtu + QINQ_HEADER} there, but {base.name} has {base.mtu}",
                      f"set `mtu {link.mtu + QINQ_HEADER}` on {base.name} (or `mtu {base.mtu - QINQ_HEADER}` on "
                      f"{link.name}) in {INTERFACES}, {RELOAD}", "mtu-qinq")


# --- bonds -------------------------------------------------------------------------------------


def bonds(net: HostNet) -> list[Finding]:
    found: list[Finding] = []
    for bond in (link for link in net.links if link.bond is not None):
        slaves = net.ports(bond.name)
        broken = {s.name: why for s in slaves if (why := _slave_trouble(s))}
        if slaves and len(broken) == len(slaves):
            found.append(Finding(
                Severity.ERROR, bond.name,
                f"no slave of bond {bond.name} works ({'; '.join(f'{n}: {w}' for n, w in broken.items())}): "
                "it passes no traffic",
                "check cables and switch ports (`ethtool <slave>`), and `ifup` the slaves", "bond-down"))
        else:
            for name, why in broken.items():
                found.append(Finding(
                    Severity.WARNING, name, f"slave of {bond.name} {why}, so the bond runs without redundancy",
                    f"check the cable and the switch port (`ethtool {name}`); `ifup {name}` if it is down",
                    "bond-slave-down"))
        working = [s for s in slaves if s.name not in broken]
        if bond.bond.mode == LACP and bond.up and working:
            found += _lacp(bond, working)
        if bond.bond.miimon == 0 and bond.bond.arp_interval == 0:
            found.append(Finding(
                Severity.WARNING, bond.name,
                "bond-miimon is 0 and no ARP monitor runs: a failed link is never noticed and the bond keeps "
                "sending through it",
                f"set `bond-miimon 100` on {bond.name} in {INTERFACES}, {RELOAD}", "bond-miimon"))
    return found


def _slave_trouble(slave: HostLink) -> str:
    if not slave.up:
        return "is down"
    if not slave.carrier:
        return "has no carrier"
    if slave.bond_slave is not None and not slave.bond_slave.mii_up:
        return "is down by its link monitor"
    return ""


def _lacp(bond: HostLink, working: list[HostLink]) -> Iterator[Finding]:
    names = ", ".join(s.name for s in working)
    if not bond.bond.has_partner:
        yield Finding(Severity.ERROR, bond.name,
                      f"802.3ad bond without an LACP partner: the switch does not answer LACP on {names}, "
                      "so no aggregate forms",
                      f"make the switch ports of {names} one LACP port-channel (mode active), or use "
                      "`bond-mode active-backup` if the switch cannot", "bond-lacp-partner")
        return
    for slave in working:
        aggregator = slave.bond_slave.aggregator if slave.bond_slave else None
        if aggregator is not None and aggregator != bond.bond.aggregator:
            yield Finding(Severity.WARNING, slave.name,
                          f"slave of 802.3ad bond {bond.name} sits in aggregator {aggregator}, not in the active "
                          f"aggregator {bond.bond.aggregator}: it carries no traffic (its switch port is in another "
                          "port-channel, or on another switch)",
                          f"put the switch ports of {', '.join(s.name for s in working)} into one LACP port-channel",
                          "bond-lacp-aggregator")


# --- bridges ----------------------------------------------------------------------------------


def bridges(net: HostNet) -> list[Finding]:
    found = []
    for bridge in (link for link in net.links if link.bridge is not None and not is_proxmox_made(link, net)):
        if bridge.bridge.stp and bridge.bridge.forward_delay > STP_DELAY_LIMIT:
            delay = bridge.bridge.forward_delay
            found.append(Finding(
                Severity.WARNING, bridge.name,
                f"STP is on with a forward delay of {delay:g} s: every new port (a starting VM's tap) listens and "
                f"learns for {2 * delay:g} s before it forwards, so VMs start without network",
                f"set `bridge-stp off` and `bridge-fd 0` on {bridge.name} in {INTERFACES} (Proxmox's default) "
                f"unless it must run STP, {RELOAD}", "bridge-stp-delay"))
    return found


def vm_tags(vms: Iterable[LocalVm], net: HostNet, nf: NetworkFile | None) -> list[Finding]:
    """A VM NIC's tag (and trunks) must be among the VLANs its VLAN-aware bridge's uplinks carry."""
    found = []
    for vm in vms:
        config = vm.config.effective()
        for index, device in net_devices(config).items():
            bridge = net.link(device.bridge)
            if bridge is None or bridge.bridge is None or not bridge.bridge.vlan_filtering:
                continue
            carried, where = _carried_vids(bridge, net, nf)
            if carried is None:
                continue
            wanted = ([device.tag] if device.tag is not None else []) + _trunks(device.trunks)
            outside = sorted(set(wanted) - set(carried))
            if outside:
                found.append(Finding(
                    Severity.ERROR, f"VM {vm.vmid} net{index}",
                    f"VLAN {format_vlan_list(outside)} is not among the VLANs {bridge.name} carries "
                    f"({where} {format_vlan_list(carried) or 'none'}): those frames never leave the host",
                    f"add {format_vlan_list(outside)} to `bridge-vids` of {bridge.name} in {INTERFACES}, {RELOAD}; "
                    f"or give net{index} a VLAN the bridge carries", "vm-tag-outside-vids"))
    return found


def _carried_vids(bridge: HostLink, net: HostNet, nf: NetworkFile | None) -> tuple[tuple[int, ...] | None, str]:
    """The VLANs the bridge carries off the host: its `bridge-vids`, else its uplinks' VLANs
    in the kernel (None: no uplink, an internal bridge)."""
    stanza = nf.stanza(bridge.name) if nf is not None else None
    if stanza is not None and stanza.bridge_vids is not None:
        return stanza.bridge_vids, "bridge-vids"
    uplinks = [p for p in net.ports(bridge.name) if is_uplink(p) and not is_proxmox_made(p, net)]
    if not uplinks:
        return None, ""
    carried = sorted(set().union(*(set(p.vids) for p in uplinks)))
    return tuple(carried), f"on {', '.join(p.name for p in uplinks)}:"


def _trunks(text: str) -> list[int]:
    vids = []
    for item in filter(None, re.split(r"[;,]", text)):
        low, _, high = item.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            vids += range(int(low), int(high or low) + 1)
    return vids


# --- NAT bridges ------------------------------------------------------------------------------


def nat(nf: NetworkFile, net: HostNet) -> list[Finding]:
    """A private bridge that masquerades (Proxmox's NAT recipe) needs the host to forward."""
    forward = net.sysctls.get(IP_FORWARD)
    if forward is None or forward == "1":
        return []
    return [Finding(
        Severity.ERROR, stanza.name,
        f"a post-up line masquerades the traffic of {stanza.name}, but {IP_FORWARD} is {forward}: the host forwards "
        "nothing, so VMs behind this NAT reach nothing outside",
        f"set {IP_FORWARD}=1 (`post-up echo 1 > /proc/sys/net/ipv4/ip_forward` on {stanza.name}, or a file in "
        "/etc/sysctl.d/), then `ifreload -a` or `sysctl --system`", "nat-forwarding")
        for stanza in nf.stanzas if any(_MASQUERADE.search(line) for line in stanza.post_up)]


def _kind_name(kind: str) -> str:
    return {"bond": "bond", "bridge": "bridge", "vlan": "VLAN device"}.get(kind, f"{kind or 'plain'} link")


def _yes(value: bool) -> str:
    return "yes" if value else "no"

