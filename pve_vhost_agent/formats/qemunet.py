"""QEMU's `info network` text, read for the agent's link ends. Pure.

A link end netN's device is a port of QEMU hub 1000+N; its socket is the pair of netdevs
the agent adds there (names.link_netdevs), listed like

    hub 1002
     \\ vhu-hup2-7f000001-20000-7f000001-20001: vhu-udp2-7f000001-20000-...: index=0,type=dgram,fd=11 inet
     \\ vhu-net2: vhu-net2: index=0,type=nic,model=virtio-net-pci,macaddr=02:00:00:00:0a:01
"""

from __future__ import annotations

import re

from pve_vhost_agent.model import names
from pve_vhost_agent.model.links import Attached, RunningLinks
from pve_vhost_agent.model.names import Address

_HUB_LINE = re.compile(r"^hub (\d+)\s*$")
_NETDEV_ID = re.compile(r"vhu-(?:udp|hup)[0-9a-f.-]+")


def running_links(info_network: str) -> RunningLinks:
    """Read QEMU's `info network` text: hubs 1000-1031 and the agent's socket netdevs."""
    devices = set()
    found: dict[tuple[int, Address, Address], list[tuple[str, str]]] = {}
    for line in info_network.replace("\r", "").splitlines():
        hub = _HUB_LINE.match(line.strip())
        if hub and names.LINK_HUB_BASE <= int(hub[1]) < names.LINK_HUB_BASE + names.MAX_NICS:
            devices.add(int(hub[1]) - names.LINK_HUB_BASE)
        for ident in _NETDEV_ID.findall(line):
            parsed = names.parse_link_netdev(ident)
            if parsed:
                kind, index, local, remote = parsed
                pair = found.setdefault((index, local, remote), [])
                if (kind, ident) not in pair:
                    pair.append((kind, ident))
    # The hub port goes before its socket (deleting the socket first would leave the port dangling).
    attached = tuple(Attached(index, local, remote, tuple(i for _k, i in sorted(ids, key=lambda p: p[0] != "hup")))
                     for (index, local, remote), ids in sorted(found.items()))
    return RunningLinks(frozenset(devices), attached)
