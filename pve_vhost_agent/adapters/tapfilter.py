"""The C-VLAN filters of a QinQ tap: tc filters on a clsact qdisc, through pyroute2.

A rule (model/netdevs.FilterRule) passing C-VLANs `first`-`last` is a `basic` filter for
802.1Q frames whose VLAN id (the `vlan_tag` meta match, PCP and DEI masked off) lies in
the range, with action `ok`; the last rule of each way is a `matchall` that drops. Only
filters in the agent's pref band are ever changed or removed.
"""

from __future__ import annotations

from typing import Iterable

from pve_vhost_agent.adapters.linkstate import CLSACT_PARENTS, read_filters
from pve_vhost_agent.errors import NetworkRefused
from pve_vhost_agent.model.netdevs import ETH_P_8021Q, FilterRule

VLAN_ID_MASK = 0x0FFF


def set_filters(ipr, index: int, name: str, rules: Iterable[FilterRule]) -> None:
    """Exactly `rules` in the agent's band of link `index` (a clsact qdisc made if needed)."""
    from pyroute2.netlink.exceptions import NetlinkError

    rules = tuple(rules)
    clear_filters(ipr, index, keep_qdisc=bool(rules))
    if not rules:
        return
    try:
        if not _has_clsact(ipr, index):
            ipr.tc("add", "clsact", index=index)
        for rule in rules:
            parent = CLSACT_PARENTS[rule.direction]
            if rule.drop:
                ipr.tc("add-filter", "matchall", index=index, parent=parent, prio=rule.pref, action="drop")
            else:
                ipr.tc("add-filter", "basic", index=index, parent=parent, prio=rule.pref, protocol=ETH_P_8021Q,
                       match=_vid_range(rule.first, rule.last), action={"kind": "gact", "action": "ok"})
    except NetlinkError as err:
        raise NetworkRefused(f"cannot put the C-VLAN filters on {name}: {err}",
                             f"is another qdisc on {name}'s ingress (`tc qdisc show dev {name}`)? "
                             "Proxmox's rate limit (rate=) uses it") from err


def clear_filters(ipr, index: int, keep_qdisc: bool = False) -> None:
    """Remove the agent's filters from link `index`; the clsact qdisc too when nothing else
    is on it (unless `keep_qdisc`)."""
    ours = read_filters(ipr, index)
    for found in ours:
        protocol = ETH_P_8021Q if found.kind == "basic" else 0x0003  # ETH_P_ALL
        ipr.tc("del-filter", found.kind, index=index, parent=CLSACT_PARENTS[found.direction], prio=found.pref,
               protocol=protocol)
    if not keep_qdisc and _has_clsact(ipr, index) and not any(
            ipr.get_filters(index=index, parent=parent) for parent in CLSACT_PARENTS.values()):
        ipr.tc("del", "clsact", index=index)


def _has_clsact(ipr, index: int) -> bool:
    return any(msg.get_attr("TCA_KIND") == "clsact" for msg in ipr.get_qdiscs(index=index))


def _vid_range(first: int, last: int) -> list[dict]:
    """An ematch tree: the frame's VLAN id is `first` (or lies within first..last)."""
    def meta(opnd: str, value: int, **more) -> dict:
        return {"kind": "meta", "object": {"kind": "vlan_tag", "opnd": opnd}, "value": value, "mask": VLAN_ID_MASK,
                **more}
    if first == last:
        return [meta("eq", first)]
    return [meta("gt", first - 1, relation="and"), meta("lt", last + 1)]
