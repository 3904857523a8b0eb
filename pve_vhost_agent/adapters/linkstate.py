"""Reading the host's links for QinQ on Linux bridges, through netlink (pyroute2).

One dump of the links (kind, MTU, master, alias, VLAN and bridge settings), one of the
bridge ports' VLAN entries (compressed ranges), and the tc filters in the agent's band of
the taps that carry its mark or are asked for. Read only.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.model.netdevs import (
    ETH_P_8021Q, FILTER_PREF_DROP, FILTER_PREF_FIRST, MARK, BridgeVlan, LinkInfo, LinkState, TcFilter,
)
from pve_vhost_agent.model.names import TAP

AF_BRIDGE = 7
RTEXT_FILTER_BRVLAN_COMPRESSED = 1 << 2
VLAN_INFO_PVID, VLAN_INFO_UNTAGGED, VLAN_INFO_RANGE_BEGIN, VLAN_INFO_RANGE_END = 0x2, 0x4, 0x8, 0x10
IFF_UP = 0x1
T = TypeVar("T")
CLSACT_PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}


def read_link_state(tc_of: Iterable[str] = ()) -> LinkState:
    """Every link of the host, with the agent's tc filters of `tc_of` and of its marked taps."""
    return over_netlink(lambda ipr: observe(ipr, tc_of))


def over_netlink(read: Callable[[Any], T]) -> T:
    """`read(ipr)` over one pyroute2 IPRoute of this network namespace; its failure said in one line."""
    from pyroute2 import IPRoute  # only what deals with Linux links (QinQ on Linux bridges, the doctor) loads netlink
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            return read(ipr)
    except (OSError, NetlinkError) as err:
        raise AgentError(f"cannot read the network links through netlink: {err}", "run as root on the host") from err


def observe(ipr, tc_of: Iterable[str] = ()) -> LinkState:
    """The links as `ipr` (an open pyroute2 IPRoute) sees them now."""
    wanted_tc = set(tc_of)
    vlans = port_vlans(ipr)
    links = []
    for msg in ipr.get_links():
        name = msg.get_attr("IFLA_IFNAME")
        info = msg.get_attr("IFLA_LINKINFO")
        data = dict(info.get_attr("IFLA_INFO_DATA")["attrs"]) if info and info.get_attr("IFLA_INFO_DATA") else {}
        kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
        alias = msg.get_attr("IFLA_IFALIAS") or ""
        links.append(LinkInfo(
            name=name, index=msg["index"], kind=kind, mtu=msg.get_attr("IFLA_MTU"), up=bool(msg["flags"] & IFF_UP),
            master=msg.get_attr("IFLA_MASTER"), alias=alias, lower=msg.get_attr("IFLA_LINK"),
            vlan_id=data.get("IFLA_VLAN_ID"), vlan_protocol=data.get("IFLA_VLAN_PROTOCOL"),
            vlan_filtering=bool(data.get("IFLA_BR_VLAN_FILTERING", 0)),
            bridge_vlan_protocol=data.get("IFLA_BR_VLAN_PROTOCOL") or ETH_P_8021Q,
            vlans=vlans.get(msg["index"], ()),
            filters=read_filters(ipr, msg["index"]) if name in wanted_tc or _marked_tap(name, alias) else (),
        ))
    return LinkState(tuple(links))


def _marked_tap(name: str, alias: str) -> bool:
    return alias.startswith(MARK + " ") and TAP.parse(name) is not None


def port_vlans(ipr) -> dict[int, tuple[BridgeVlan, ...]]:
    """VLAN entries of every bridge port, by link index (ranges expanded)."""
    found: dict[int, tuple[BridgeVlan, ...]] = {}
    # match={}: without it pyroute2 takes ext_mask for a filter of its own, not the request's
    for msg in ipr.link("dump", family=AF_BRIDGE, ext_mask=RTEXT_FILTER_BRVLAN_COMPRESSED, match={}):
        spec = msg.get_attr("IFLA_AF_SPEC")
        if not spec:
            continue
        entries, begin = [], None
        for entry in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO"):
            vid, flags = entry["vid"], entry["flags"]
            if flags & VLAN_INFO_RANGE_BEGIN:
                begin = vid
                continue
            first = begin if begin is not None and flags & VLAN_INFO_RANGE_END else vid
            begin = None
            entries += [BridgeVlan(v, bool(flags & VLAN_INFO_PVID), bool(flags & VLAN_INFO_UNTAGGED))
                        for v in range(first, vid + 1)]
        found[msg["index"]] = tuple(entries)
    return found


def read_filters(ipr, index: int) -> tuple[TcFilter, ...]:
    """The tc filters of link `index` (clsact, both ways) in the agent's pref band."""
    found = set()
    for direction, parent in CLSACT_PARENTS.items():
        for msg in ipr.get_filters(index=index, parent=parent):
            pref = msg["info"] >> 16
            if FILTER_PREF_FIRST <= pref <= FILTER_PREF_DROP:
                found.add(TcFilter(direction, pref, msg.get_attr("TCA_KIND")))
    return tuple(sorted(found, key=lambda f: (f.direction, f.pref)))
