"""What the agent observes of VM-to-VM links: a running QEMU's link ends, and where VMs
and nodes are. Values only (adapters/links.py reads them, plan/links.py decides on them)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from pve_vhost_agent.model.names import Address


@dataclasses.dataclass(frozen=True)
class Attached:
    """A socket QEMU has on an end's hub, as its netdev ids say (names.link_netdevs)."""

    index: int
    local: Address
    remote: Address
    netdevs: tuple[str, ...]  # its hub port and socket ids, in the order to delete them


@dataclasses.dataclass(frozen=True)
class LinkFacts:
    """What the links of VMs on node `here` are planned on: where each VM is (the node
    whose folder holds its config, None: nowhere), each node's ring0_addr, and the
    interface holding this node's address with its MTU (read only when a peer is remote)."""

    here: str
    nodes: Mapping[int, str | None]
    addresses: Mapping[str, str] = dataclasses.field(default_factory=dict)
    underlay: tuple[str | None, int | None] = (None, None)


@dataclasses.dataclass(frozen=True)
class RunningLinks:
    """A running QEMU's link ends: the hubs its args gave it, and the sockets on them."""

    devices: frozenset[int] = frozenset()  # N of each link end device (hub 1000+N exists)
    attached: tuple[Attached, ...] = ()
