"""What the agent observes of the host itself: memory capacity, network links, /etc/pve."""

from __future__ import annotations

import dataclasses
from typing import Mapping

# The cluster file system /etc/pve as observed (adapters.pvefs.cluster_fs).
CLUSTER_FS_OK, CLUSTER_FS_NOT_MOUNTED, CLUSTER_FS_READ_ONLY = "ok", "not mounted", "read-only"


@dataclasses.dataclass(frozen=True)
class HostMemory:
    """Observed host capacity (adapters.host.read_host_memory)."""

    available_kib: int  # MemAvailable
    hugepages_free: Mapping[int, int]  # page size in KiB -> free pages


@dataclasses.dataclass(frozen=True)
class Link:
    """One network link as netlink reports it."""

    name: str
    index: int
    mtu: int
    kind: str  # "veth", "tun", "bond", "bridge", "openvswitch", "" for plain devices
    up: bool
    master: int | None  # index of the bridge/bond this link is enslaved to


@dataclasses.dataclass(frozen=True)
class Folder:
    """A folder the agent keeps sockets in, as found: missing, fine, or why not to trust it."""

    path: str
    exists: bool
    problem: str = ""  # e.g. "writable by others (mode 0777)"; '' when it can be used
