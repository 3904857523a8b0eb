"""The one-line status of this node (systemd's STATUS=, `pve-vhost-agent status`). Pure.

    3 VMs (2 running): 5 vhost-user ports (4 connected), 2 QinQ taps; last pass 14:02:11 ok; 0 problems
"""

from __future__ import annotations

import datetime
from typing import Sequence

from pve_vhost_agent.model.host import CLUSTER_FS_NOT_MOUNTED
from pve_vhost_agent.model.links import ROLE_TAP
from pve_vhost_agent.model.ovs import OWNS_PORT, OWNS_VLAN
from pve_vhost_agent.plan.node import NodePlan
from pve_vhost_agent.plan.observed import NodeState, Problem

MAX_PROBLEM_CHARS = 200  # systemctl status shows one line; keep the first problem readable


def node_summary(state: NodeState, plan: NodePlan, failures: Sequence[Problem] = ()) -> dict:
    """Counts and problems as plain values (the `--json` form)."""
    enabled = state.enabled_vms
    summary: dict = {
        "cluster_fs": state.cluster_fs,
        "vms": len(enabled) if state.cluster_fs != CLUSTER_FS_NOT_MOUNTED else None,
        "running": sum(1 for vm in enabled if vm.vmid in state.running),
        "ovs": "ok" if state.ovs is not None else "unreachable",
        "vhost_ports": None,
        "connected": None,
        "qinq_taps": None,
        "pending": [{"sentence": action.sentence(), **action.fields()} for action in plan.actions],
        "problems": [str(p) for p in (*plan.problems, *failures)],
        "at_next_start": list(plan.at_next_start),
    }
    if state.ovs is not None:
        owned = state.ovs.owned_ports()
        vhost = [p for p in owned if p.owner == OWNS_PORT]
        summary["vhost_ports"] = len(vhost)
        summary["connected"] = sum(1 for p in vhost if p.interface and p.interface.status.get("status") == "connected")
        summary["qinq_taps"] = sum(1 for p in owned if p.owner == OWNS_VLAN)
    if state.links is not None:  # QinQ taps on Linux bridges
        summary["qinq_taps"] = (summary["qinq_taps"] or 0) + len(state.links.marked(ROLE_TAP))
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
        ports = "Open vSwitch unreachable" + (f", {_count(summary['qinq_taps'], 'QinQ tap')}"
                                              if summary["qinq_taps"] else "")
    problems, pending = summary["problems"], summary["pending"]
    clean = not problems and not pending and summary["ovs"] == "ok"
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


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
