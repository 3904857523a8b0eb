"""The host's networking as the doctor sees it, as frozen values: the kernel's links (read
through netlink), a few sysctls, /etc/network/interfaces as declared, and host facts
(CPUs, memory, installed packages). No I/O here: adapters/hostnet.py reads them,
formats/interfaces.py parses the file, plan/doctor*.py judge them.

The same netlink dump (adapters/linkstate.py) gives QinQ on Linux bridges its own view,
model/netdevs.py: links by index with the agent's marks and tc filters, what it changes.
The doctor's view names masters and lower devices and carries bond and bridge state, what
it judges; neither needs the other's.
"""

from __future__ import annotations

import dataclasses
import functools
from pve_vhost_agent.model.host import HostMemory
from pve_vhost_agent.model.ovs import FrozenMap

# The bonding driver's modes and hash policies by number, named as ifupdown2 writes them.
BOND_MODES = ("balance-rr", "active-backup", "balance-xor", "broadcast", "802.3ad", "balance-tlb", "balance-alb")
XMIT_HASH_POLICIES = ("layer2", "layer3+4", "layer2+3", "encap2+3", "encap3+4", "vlan+srcmac")
LACP = "802.3ad"
DOT1Q, DOT1AD = "802.1q", "802.1ad"
NO_PARTNER = "00:00:00:00:00:00"
IP_FORWARD = "net.ipv4.ip_forward"  # the sysctls the doctor reads, by their sysctl name
SYSCTLS = (IP_FORWARD,)


def bond_mode_name(text: str) -> str | None:
    """`802.3ad` or `4` -> `802.3ad`; None for a mode the bonding driver does not know."""
    text = text.strip().lower()
    if text.isdigit():
        return BOND_MODES[int(text)] if int(text) < len(BOND_MODES) else None
    return text if text in BOND_MODES else None


# --- the kernel -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BondState:
    mode: str  # one of BOND_MODES
    miimon: int = 0  # ms; 0: the MII link monitor is off
    arp_interval: int = 0  # ms; 0: the ARP monitor is off
    xmit_hash_policy: str = ""
    aggregator: int | None = None  # 802.3ad: the active aggregator's id
    partner_mac: str = ""  # 802.3ad: the LACP partner's system MAC of the active aggregator

    @property
    def has_partner(self) -> bool:
        return self.partner_mac not in ("", NO_PARTNER)


@dataclasses.dataclass(frozen=True)
class BondSlaveState:
    mii_up: bool
    active: bool  # the bond sends through it (not a backup slave)
    aggregator: int | None = None  # 802.3ad: the aggregator it joined


@dataclasses.dataclass(frozen=True)
class VlanState:
    vid: int
    protocol: str  # DOT1Q or DOT1AD


@dataclasses.dataclass(frozen=True)
class BridgeState:
    vlan_filtering: bool = False
    vlan_protocol: str = DOT1Q
    stp: bool = False
    forward_delay: float = 0.0  # seconds


@dataclasses.dataclass(frozen=True)
class HostLink:
    """One kernel link with what the doctor needs of its kind."""

    name: str
    index: int
    kind: str  # "bond", "bridge", "vlan", "veth", "tun", "openvswitch", "" (a NIC) ...
    mtu: int
    up: bool  # administratively up
    carrier: bool = True
    master: str = ""  # the bond or bridge it is a port of
    lower: str = ""  # VLAN devices: the device below
    bond: BondState | None = None
    bond_slave: BondSlaveState | None = None
    vlan: VlanState | None = None
    bridge: BridgeState | None = None
    vids: tuple[int, ...] = ()  # a port of a VLAN-aware bridge: its VLANs (`bridge vlan show`)


@dataclasses.dataclass(frozen=True)
class HostNet:
    """One reading of the kernel's links and the sysctls the checks need."""

    links: tuple[HostLink, ...] = ()
    sysctls: FrozenMap = FrozenMap()  # sysctl name -> value; missing when unreadable

    @functools.cached_property
    def _by_name(self) -> dict[str, HostLink]:
        return {link.name: link for link in self.links}

    def link(self, name: str) -> HostLink | None:
        return self._by_name.get(name)

    def ports(self, master: str) -> tuple[HostLink, ...]:
        """The links enslaved to bond or bridge `master`, by name."""
        return tuple(sorted((link for link in self.links if link.master == master), key=lambda l: l.name))


# --- /etc/network/interfaces ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IfaceStanza:
    """An interface as /etc/network/interfaces (and the files it sources) declares it; the
    `iface` stanzas of one name (inet and inet6) merged. None: not declared."""

    name: str
    where: str  # "file:line" of its first `iface` line
    auto: bool = False
    method: str = ""  # manual, static, dhcp, loopback ...
    mtu: int | None = None
    bond_slaves: tuple[str, ...] | None = None  # a bond (bond-slaves/bond-ports; `none` is empty)
    bond_mode: str | None = None  # one of BOND_MODES
    bond_miimon: int | None = None
    bond_xmit_hash_policy: str | None = None
    bridge_ports: tuple[str, ...] | None = None  # a Linux bridge (`none` is empty)
    bridge_vlan_aware: bool | None = None
    bridge_vids: tuple[int, ...] | None = None
    bridge_stp: bool | None = None
    bridge_fd: float | None = None  # seconds
    vlan_raw_device: str | None = None  # a VLAN device: from vlan-raw-device or a dotted name
    vlan_id: int | None = None
    vlan_protocol: str | None = None  # DOT1Q or DOT1AD when declared
    ovs_type: str = ""  # OVSBridge, OVSBond, OVSPort, OVSIntPort: Open vSwitch's, not the kernel's
    post_up: tuple[str, ...] = ()  # post-up and up commands

    @property
    def is_bond(self) -> bool:
        return self.bond_slaves is not None and not self.ovs_type

    @property
    def is_bridge(self) -> bool:
        return self.bridge_ports is not None and not self.ovs_type

    @property
    def is_vlan(self) -> bool:
        return self.vlan_id is not None and not self.ovs_type


@dataclasses.dataclass(frozen=True)
class NetworkFile:
    """/etc/network/interfaces with everything it sources."""

    stanzas: tuple[IfaceStanza, ...] = ()
    files: tuple[str, ...] = ()  # every file read, in reading order
    problems: tuple[str, ...] = ()  # lines ifupdown2 would complain about: "file:line: what"

    @functools.cached_property
    def _by_name(self) -> dict[str, IfaceStanza]:
        return {s.name: s for s in self.stanzas}

    def stanza(self, name: str) -> IfaceStanza | None:
        return self._by_name.get(name)

    def depended_on(self) -> frozenset[str]:
        """Names an `auto` interface needs (its slaves, ports, raw devices), recursively:
        ifupdown2 brings them up with it."""
        needed: set[str] = set()
        todo = [s.name for s in self.stanzas if s.auto]
        while todo:
            stanza = self.stanza(todo.pop())
            if stanza is None:
                continue
            for name in (*(stanza.bond_slaves or ()), *(stanza.bridge_ports or ()),
                         *((stanza.vlan_raw_device,) if stanza.vlan_raw_device else ())):
                if name not in needed:
                    needed.add(name)
                    todo.append(name)
        return frozenset(needed)

    def bridge_of(self, port: str) -> IfaceStanza | None:
        """The bridge stanza listing `port` in its bridge-ports."""
        return next((s for s in self.stanzas if s.is_bridge and port in (s.bridge_ports or ())), None)


# --- the rest of the host -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """What the OVS-DPDK and hugepage checks need to know about the host itself."""

    cpus: int
    mem_total_kib: int
    memory: HostMemory
    packages: frozenset[str] = frozenset()  # Debian packages installed (dpkg's status file)
    vswitchd_alternative: str = ""  # where the ovs-vswitchd alternative points ('' when unset)
    packages_known: bool = True  # False when dpkg's status file could not be read

