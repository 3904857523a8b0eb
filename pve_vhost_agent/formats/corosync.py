"""The node list of /etc/pve/corosync.conf: each node's cluster address, as Proxmox knows it.

Pure. corosync's format is nested `name { key: value }` blocks, `#` comments; Proxmox
writes one `node { name: ...  ring0_addr: ... }` block per node inside `nodelist`. The
link tunnels between nodes use `ring0_addr`, the address the cluster itself runs on.

    nodelist {
      node {
        name: pve1
        nodeid: 1
        quorum_votes: 1
        ring0_addr: 192.0.2.11
      }
    }
"""

from __future__ import annotations

import re

from pve_vhost_agent.errors import SpecError

_LINE = re.compile(r"^\s*(?:(?P<open>[A-Za-z0-9_.-]+)\s*\{|(?P<key>[A-Za-z0-9_.-]+)\s*:\s*(?P<value>.*?)|(?P<close>\}))\s*$")


def node_addresses(text: str, source: str = "corosync.conf") -> dict[str, str]:
    """{node name: ring0_addr} of every node in `nodelist` (a node without either is left out)."""
    path: list[str] = []
    nodes: dict[str, str] = {}
    current: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        match = _LINE.match(line)
        if not match:
            raise SpecError(f"{source} line {lineno}: {line.strip()[:60]!r} is not corosync's syntax",
                            "fix the file (pvecm and corosync read it too)")
        if match["open"]:
            path.append(match["open"])
            if path == ["nodelist", "node"]:
                current = {}
        elif match["close"]:
            if not path:
                raise SpecError(f"{source} line {lineno}: a `}}` closes nothing", "fix the file's braces")
            if path == ["nodelist", "node"] and "name" in current and "ring0_addr" in current:
                nodes[current["name"]] = current["ring0_addr"]
            path.pop()
        elif path == ["nodelist", "node"]:
            current[match["key"]] = match["value"]
    if path:
        raise SpecError(f"{source}: `{path[-1]} {{` is never closed", "fix the file's braces")
    return nodes
