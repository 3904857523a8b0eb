"""Linux network links as the agent observed them (netlink), and the agent's marks on them.

Pure values. QinQ on a NIC of one of Proxmox's Linux bridges is made of kernel devices
(plan/lbqinq.py says which): the agent marks each device it makes, and each of Proxmox's
taps it turns into a QinQ port, with an interface alias (`ip link show` prints it as
`alias`), which says whose it is and what it records:

    pve-vhost-agent role=sbridge bridge=vmbr0 stag=950 ethertype=802.1ad
    pve-vhost-agent role=tap vmid=100 nic=net0 bridge=vmbr0 stag=950 ethertype=802.1ad via=vmbr0a950 was=vmbr0 was-vlans=950pu

A tap's mark keeps where Proxmox had plugged it (`was`, `was-vlans`), so the agent can
give it back; the device goes with QEMU, and its mark with it. Observation, not a state
file, tells the hooks and the service what is the agent's: a device without a mark is
never changed or removed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.model.spec import EtherType, QinQ, format_vlan_list, is_decimal, parse_vlan_list
from pve_vhost_agent.model.names import nic_index, svlan_device

ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
TPID = {EtherType.DOT1Q: ETH_P_8021Q, EtherType.DOT1AD: ETH_P_8021AD}

MARK = "pve-vhost-agent"  # an alias starting with this word (and a space) is the agent's
MAX_ALIAS = 255  # IFALIASZ - 1
ROLE_SBRIDGE = "sbridge"  # the S-VLAN bridge: the S-VLAN device and the QinQ taps are its ports
ROLE_SVLAN = "svlan"  # the VLAN device that pushes and pops the S-tag
ROLE_TRUNK = "trunk"  # veth end in Proxmox's bridge, a tagged member of its VLAN S
ROLE_PEER = "peer"  # the other veth end, lower device of the S-VLAN device
ROLE_TAP = "tap"  # Proxmox's tap made a QinQ port (only its placement and filters are the agent's)
DEVICE_ROLES = (ROLE_SBRIDGE, ROLE_SVLAN, ROLE_TRUNK, ROLE_PEER)

# tc filters the agent puts on a QinQ tap's clsact qdisc (C-VLAN filtering), by pref:
# one per C-VLAN range, then one that drops the rest. Nothing else uses this band.
FILTER_PREF_FIRST = 0xC000
FILTER_PREF_DROP = 0xCFFF
INGRESS, EGRESS = "ingress", "egress"


@dataclasses.dataclass(frozen=True)
class BridgeVlan:
    """One VLAN entry of a port of a VLAN-aware bridge (`bridge vlan show`)."""

    vid: int
    pvid: bool = False
    untagged: bool = False


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a tap is plugged: its bridge and, on a VLAN-aware bridge, its VLAN entries."""

    master: str = ""
    vlans: tuple[BridgeVlan, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "vlans", tuple(sorted(set(self.vlans), key=lambda v: v.vid)))

    def describe(self) -> str:
        """`vmbr0, VLAN 950 untagged (PVID)`; `vmbr0v950`; `no bridge`."""
        if not self.master:
            return "no bridge"
        parts = []
        for flags, name in (((True, True), "untagged (PVID)"), ((False, True), "untagged"), ((True, False), "(PVID)"),
                            ((False, False), "tagged")):
            vids = [v.vid for v in self.vlans if (v.pvid, v.untagged) == flags]
            if vids:
                parts.append(f"VLAN {format_vlan_list(vids)} {name}")
        return ", ".join([self.master, *parts])

    def vlans_text(self) -> str:
        """The VLAN entries in the mark's form: `950pu` (PVID, untagged), `2-4094` (tagged)."""
        groups: dict[str, list[int]] = {}
        for vlan in self.vlans:
            groups.setdefault(("p" if vlan.pvid else "") + ("u" if vlan.untagged else ""), []).append(vlan.vid)
        return ",".join(f"{format_vlan_list(vids).replace(',', f'{flags},')}{flags}" for flags, vids in groups.items())

    @staticmethod
    def parse_vlans(text: str) -> tuple[BridgeVlan, ...] | None:
        """The entries `vlans_text` wrote; None for anything else."""
        vlans: list[BridgeVlan] = []
        for item in filter(None, text.split(",")):
            vids, flags = item.rstrip("pu"), item[len(item.rstrip("pu")):]
            if flags not in ("", "p", "u", "pu"):
                return None
            try:
                vlans += [BridgeVlan(vid, "p" in flags, "u" in flags) for vid in parse_vlan_list(vids)]
            except AgentError:
                return None
        return tuple(vlans)


@dataclasses.dataclass(frozen=True)
class LinkMark:
    """What the agent's alias on a link says (see the module's note)."""

    role: str
    bridge: str  # Proxmox's bridge the S-VLAN belongs to
    stag: int
    ethertype: EtherType
    vmid: int | None = None  # taps: whose
    nic: str = ""
    cvlans: tuple[int, ...] = ()  # taps: the C-VLANs its filters pass (empty: all, no filters)
    via: str = ""  # taps: where the agent plugged it
    saved: Placement | None = None  # taps: where Proxmox had plugged it

    @property
    def qinq(self) -> QinQ:
        return QinQ(self.stag, self.cvlans, self.ethertype)

    def alias(self) -> str:
        fields = {"role": self.role, "vmid": self.vmid, "nic": self.nic, "bridge": self.bridge, "stag": self.stag,
                  "ethertype": self.ethertype.value, "cvlans": format_vlan_list(self.cvlans), "via": self.via}
        if self.saved is not None:
            fields.update({"was": self.saved.master or "-", "was-vlans": self.saved.vlans_text()})
        return " ".join([MARK, *(f"{k}={v}" for k, v in fields.items() if v not in (None, ""))])

    @classmethod
    def parse(cls, alias: str) -> "LinkMark | None":
        """None for an alias the agent did not write (someone else's, or edited)."""
        words = alias.split(" ")
        if words[0] != MARK:
            return None
        try:
            fields = dict(word.split("=", 1) for word in words[1:])
            vmid = fields.pop("vmid", None)
            saved = None
            if "was" in fields:
                vlans = Placement.parse_vlans(fields.pop("was-vlans", ""))
                if vlans is None:
                    return None
                master = fields.pop("was")
                saved = Placement("" if master == "-" else master, vlans)
            mark = cls(role=fields.pop("role"), bridge=fields.pop("bridge"), stag=int(fields.pop("stag")),
                       ethertype=EtherType(fields.pop("ethertype")),
                       vmid=int(vmid) if vmid is not None and is_decimal(vmid) else None,
                       nic=fields.pop("nic", ""), cvlans=_vlan_list(fields.pop("cvlans", "")),
                       via=fields.pop("via", ""), saved=saved)
            mark.qinq  # noqa: B018 - checks the S-tag and C-VLANs
        except (ValueError, KeyError, AgentError):
            return None
        if fields or mark.role not in (*DEVICE_ROLES, ROLE_TAP) or mark.alias() != alias:
            return None
        if mark.role == ROLE_TAP and (mark.vmid is None or nic_index(mark.nic) is None):
            return None
        return mark

    def same_svlan(self, other: "LinkMark") -> bool:
        return (self.bridge, self.stag, self.ethertype) == (other.bridge, other.stag, other.ethertype)


def _vlan_list(text: str) -> tuple[int, ...]:
    return parse_vlan_list(text) if text else ()


@dataclasses.dataclass(frozen=True)
class SVlanBridge:
    """What the agent makes for S-VLAN `stag` (TPID `ethertype`) of Proxmox's Linux bridge
    `bridge`: a bridge whose ports are the S-VLAN device and the QinQ taps.

    The S-VLAN device (a VLAN device of that TPID and id) sits on `lower`: the bridge's
    uplink, or, when the S-tag has the TPID the bridge classifies its own VLANs by
    (`through_bridge`), on a veth whose other end is a tagged member of VLAN `stag` in
    the bridge, so the S-VLAN is the bridge's own VLAN S, shared with its tag=S NICs.
    """

    bridge: str
    stag: int
    ethertype: EtherType
    lower: str
    through_bridge: bool = False
    mtu: int = 1500  # of the veth pair: the uplink's, so the bridge's MTU is never lowered

    def name(self, role: str = ROLE_SBRIDGE) -> str:
        return svlan_device(self.bridge, self.ethertype.value, self.stag, _ROLE_LETTER[role])

    @property
    def key(self) -> tuple[str, int, EtherType]:
        return self.bridge, self.stag, self.ethertype

    @property
    def roles(self) -> tuple[str, ...]:
        return (ROLE_SBRIDGE, ROLE_SVLAN) + ((ROLE_TRUNK, ROLE_PEER) if self.through_bridge else ())

    def mark(self, role: str) -> LinkMark:
        return LinkMark(role, self.bridge, self.stag, self.ethertype)

    def describe(self) -> str:
        where = (f"on veth {self.name(ROLE_PEER)}, whose peer {self.name(ROLE_TRUNK)} carries VLAN {self.stag} "
                 f"in {self.bridge}") if self.through_bridge else f"on {self.lower}"
        return f"S-tag {self.stag} ({self.ethertype.value}) by {self.name(ROLE_SVLAN)} {where}"


_ROLE_LETTER = {ROLE_SBRIDGE: "", ROLE_SVLAN: "u", ROLE_TRUNK: "t", ROLE_PEER: "p"}


def svlan_key(mark: LinkMark) -> tuple[str, int, EtherType]:
    return mark.bridge, mark.stag, mark.ethertype


@dataclasses.dataclass(frozen=True)
class FilterRule:
    """One tc filter of a QinQ tap's C-VLAN filtering: pass the 802.1Q C-VLANs `first` to
    `last` (a basic filter matching the tag's VLAN id), or drop everything else (`drop`)."""

    direction: str  # INGRESS (from the guest) or EGRESS (to the guest)
    pref: int
    first: int = 0
    last: int = 0
    drop: bool = False

    @property
    def kind(self) -> str:
        return "matchall" if self.drop else "basic"


def filter_rules(cvlans: Iterable[int]) -> tuple[FilterRule, ...]:
    """The filters that let only these C-VLANs through, both ways, as OVS's `cvlans` does
    (untagged frames and other C-VLANs dropped); none when every C-VLAN may pass."""
    ranges: list[tuple[int, int]] = []
    for vid in sorted(set(cvlans)):
        if ranges and ranges[-1][1] == vid - 1:
            ranges[-1] = (ranges[-1][0], vid)
        else:
            ranges.append((vid, vid))
    if not ranges:
        return ()
    return tuple(rule for direction in (INGRESS, EGRESS) for rule in (
        *(FilterRule(direction, FILTER_PREF_FIRST + n, first, last) for n, (first, last) in enumerate(ranges)),
        FilterRule(direction, FILTER_PREF_DROP, drop=True)))


@dataclasses.dataclass(frozen=True)
class TcFilter:
    """A tc filter found on a tap in the agent's pref band."""

    direction: str
    pref: int
    kind: str


@dataclasses.dataclass(frozen=True)
class LinkInfo:
    """One network link as netlink reports it, with what Linux-bridge QinQ reads of it."""

    name: str
    index: int
    kind: str = ""  # IFLA_INFO_KIND: "bridge", "vlan", "veth", "bond", "tun", "" for a NIC
    mtu: int = 1500
    up: bool = True
    master: int | None = None
    alias: str = ""
    lower: int | None = None  # IFLA_LINK: a VLAN device's lower device, a veth's peer
    vlan_id: int | None = None  # VLAN devices
    vlan_protocol: int | None = None
    vlan_filtering: bool = False  # bridges
    bridge_vlan_protocol: int = ETH_P_8021Q
    vlans: tuple[BridgeVlan, ...] = ()  # ports of a VLAN-aware bridge
    filters: tuple[TcFilter, ...] = ()  # the agent's tc filters (read for marked and declared taps)

    @functools.cached_property
    def mark(self) -> LinkMark | None:
        return LinkMark.parse(self.alias) if self.alias.startswith(MARK + " ") else None

    @property
    def is_bridge(self) -> bool:
        return self.kind == "bridge"


@dataclasses.dataclass(frozen=True)
class LinkState:
    """One reading of the host's links."""

    links: tuple[LinkInfo, ...] = ()

    @functools.cached_property
    def _by_name(self) -> dict[str, LinkInfo]:
        return {link.name: link for link in self.links}

    @functools.cached_property
    def _by_index(self) -> dict[int, LinkInfo]:
        return {link.index: link for link in self.links}

    def get(self, name: str) -> LinkInfo | None:
        return self._by_name.get(name)

    def by_index(self, index: int | None) -> LinkInfo | None:
        return self._by_index.get(index) if index is not None else None

    def master_of(self, link: LinkInfo) -> LinkInfo | None:
        return self.by_index(link.master)

    def ports(self, bridge: LinkInfo) -> tuple[LinkInfo, ...]:
        return tuple(link for link in self.links if link.master == bridge.index)

    def placement(self, link: LinkInfo) -> Placement:
        master = self.master_of(link)
        return Placement(master.name if master else "", link.vlans if master and master.vlan_filtering else ())

    def marked(self, role: str | None = None) -> tuple[LinkInfo, ...]:
        return tuple(link for link in self.links if link.mark and (role is None or link.mark.role == role))
