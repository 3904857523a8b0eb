"""The actions of link ends in a running QEMU (applied over QMP; plan/links.py plans them).
The rules of model/actions.py hold.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from pve_vhost_agent.model.actions import QMP, Action, because


def _address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclasses.dataclass(frozen=True)
class ConnectLink(Action):
    """Give link end `nic` of running VM `vmid` a UDP socket bound to `local` and connected
    to `remote` (the peer end), in place of the sockets named in `replaces`."""

    vmid: int
    nic: str
    local: tuple[str, int]
    remote: tuple[str, int]
    peer: str  # the peer end, e.g. 101:net3
    peer_node: str
    replaces: tuple[str, ...] = ()  # netdev ids of the sockets it had
    target: ClassVar[str] = QMP

    def sentence(self) -> str:
        verb = "re-point" if self.replaces else "connect"
        return (f"{verb} link {self.nic} to {self.peer} on {self.peer_node} "
                f"({_address(self.local)} -> {_address(self.remote)})")

    def details(self) -> dict[str, Any]:
        return {"peer": self.peer, "peer_node": self.peer_node, "local": _address(self.local),
                "remote": _address(self.remote), "replaces": ",".join(self.replaces)}


@dataclasses.dataclass(frozen=True)
class DisconnectLink(Action):
    """Remove the UDP sockets `netdevs` from link end `nic` of running VM `vmid` (its
    device stays until the VM's next start, dark)."""

    vmid: int
    nic: str
    netdevs: tuple[str, ...]
    reason: str
    target: ClassVar[str] = QMP

    def sentence(self) -> str:
        return f"disconnect link {self.nic}{because(self.reason)}"

    def details(self) -> dict[str, Any]:
        return {"netdevs": ",".join(self.netdevs), "reason": self.reason}
