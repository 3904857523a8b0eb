"""The one-line status of this node (systemd's STATUS=, `pve-vhost-agent status`). Pure.

    3 VMs (2 running): 5 vhost-user ports (4 connected), 2 QinQ taps; last pass 14:02:11 ok; 0 problems

A node with VM-to-VM links adds its running VMs' link ends: `..., 2 QinQ taps, 6 link ends (6 connected); ...`.
"""

from __future__ import annotations

import datetime
from typing import Sequence

from pve_vhost_agent.model.host import CLUSTER_FS_NOT_MOUNTED
from pve_vhost_agent.model.netdevs import ROLE_TAP
from pve_vhost_agent.model.ovs import OWNS_PORT, OWNS_VLAN
from pve_vhost_agent.plan.links import EndSocket, connected_ends, wanted_sockets
from pve_vhost_agent.plan.node import NodePlan, needs_ovs
from pve_vhost_agent.plan.observed import NodeState, Problem

MAX_PROBLEM_CHARS = 200  # systemctl status shows one line; keep the first problem readable


def node_summary(state: NodeState, plan: NodePlan, failures: Sequence[Problem] = ()) -> dict:
    """Counts and problems as plain values (the `--json` form)."""
    enabled = state.enabled_vms
    summary: dict = {
        "cluster_fs": state.cluster_fs,
        "vms": len(enabled) if state.cluster_fs != CLUSTER_FS_NOT_MOUNTED else None,
        "running": sum(1 for vm in enabled if vm.vmid in state.running),
        # "not needed": unreachable, but no VM here has anything on Open vSwitch
        "ovs": "ok" if state.ovs is not None else "unreachable" if needs_ovs(state) else "not needed",
        "vhost_ports": None,
        "connected": None,
        "qinq_taps": None,
        "pending": [{"sentence": action.sentence(), **action.fields()} for action in plan.actions],
        "problems": [str(p) for p in (*plan.problems, *failures)],
        "at_next_start": list(plan.at_next_start),
    }
    summary.update(_link_counts(state))
    if state.ovs is not None:
        owned = state.ovs.owned_ports()
        vhost = [p for p in owned if p.owner == OWNS_PORT]
        summary["vhost_ports"] = len(vhost)
        summary["connected"] = sum(1 for p in vhost if p.interface and p.interface.status.get("status") == "connected")
        summary["qinq_taps"] = sum(1 for p in owned if p.owner == OWNS_VLAN)
    if state.netdevs is not None:  # QinQ taps on Linux bridges
        summary["qinq_taps"] = (summary["qinq_taps"] or 0) + len(state.netdevs.marked(ROLE_TAP))
    return summary


def status_line(summary: dict, when: datetime.datetime, label: str = "last pass") -> str:
    """One line: VMs, ports, when and whether all was well, problems (the first one named)."""
    if summary["vms"] is None:
        vms = f"VMs unknown (/etc/pve {summary['cluster_fs']})"
    else:
        vms = f"{_count(summary['vms'], 'VM')} ({summary['running']} running)"
    if summary["ovs"] == "ok":
        ports = (f"{_count(summary['vhost_ports'], 'vhost-user port')} ({summary['connected']} connected), "
                 f"{_count(summary['qinq_taps'], 'QinQ tap')}")
    else:
        ports = f"Open vSwitch {summary['ovs']}" + (f", {_count(summary['qinq_taps'], 'QinQ tap')}"
                                              if summary["qinq_taps"] else "")
    if summary.get("link_ends"):
        ports += f", {_count(summary['link_ends'], 'link end')} ({summary['links_connected']} connected)"
    problems, pending = summary["problems"], summary["pending"]
    clean = not problems and not pending and summary["ovs"] != "unreachable"
    parts = [f"{vms}: {ports}", f"{label} {when:%H:%M:%S}{' ok' if clean else ''}"]
    if pending:
        parts.append(f"{_count(len(pending), 'change')} pending")
    if problems:
        first = problems[0]
        if len(first) > MAX_PROBLEM_CHARS:
            first = first[:MAX_PROBLEM_CHARS - 3] + "..."
        parts.append(f"{_count(len(problems), 'problem')}, first: {first}")
    else:
        parts.append("0 problems")
    return "; ".join(parts)


def _link_counts(state: NodeState) -> dict:
    """The link ends of this node's running VMs, and how many point where they must."""
    if state.spec is None or state.link_facts is None:
        return {"link_ends": 0, "links_connected": 0, "links": []}
    rows, connected = [], 0
    for vmid, running in sorted(state.links.items()):
        ends = state.spec.for_vm(vmid).links
        wanted = wanted_sockets(ends, state.link_facts)
        good = {end.index for end in connected_ends(ends, wanted, running)}
        connected += len(good)
        for end in ends:
            want = wanted[end.index]
            rows.append({"end": end.end, "peer": end.peer_end, "connected": end.index in good,
                         "peer_node": want.peer_node if isinstance(want, EndSocket) else None})
    return {"link_ends": len(rows), "links_connected": connected, "links": rows}


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
