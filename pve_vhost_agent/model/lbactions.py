"""The actions of QinQ on Proxmox's tap NICs of Linux bridges (applied over netlink, under
the agent's netdev lock; plan/lbqinq.py plans them). The rules of model/actions.py hold.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from pve_vhost_agent.model.actions import NETLINK, Action, because
from pve_vhost_agent.model.netdevs import Placement, SVlanBridge
from pve_vhost_agent.model.spec import QinQ, VlanPolicy


@dataclasses.dataclass(frozen=True)
class AddSVlanBridge(Action):
    """The agent's devices for one S-VLAN of a Proxmox Linux bridge (each may exist)."""

    svlan: SVlanBridge
    target: ClassVar[str] = NETLINK

    @property
    def bridge(self) -> str:
        return self.svlan.bridge

    def sentence(self) -> str:
        return f"create S-VLAN bridge {self.svlan.name()} for {self.bridge}: {self.svlan.describe()}"

    def details(self) -> dict[str, Any]:
        return {"sbridge": self.svlan.name(), "stag": self.svlan.stag, "qinq_ethtype": self.svlan.ethertype.value,
                "lower": self.svlan.lower, "mtu": self.svlan.mtu if self.svlan.through_bridge else None}


@dataclasses.dataclass(frozen=True)
class SetLinuxTapQinQ(Action):
    """Proxmox's tap on a Linux bridge made a QinQ port: marked with where Proxmox had
    plugged it (`saved`), given the C-VLAN filters, plugged into `master`."""

    port: str
    vmid: int
    nic: str
    bridge: str  # the NIC's bridge in the VM config
    qinq: QinQ
    master: str
    saved: Placement
    target: ClassVar[str] = NETLINK

    def sentence(self) -> str:
        return (f"make Proxmox's {self.port} a QinQ port: {VlanPolicy(qinq=self.qinq).describe()}, in {self.master} "
                f"(Proxmox plugged it into {self.saved.describe()})")

    def details(self) -> dict[str, Any]:
        return {"stag": self.qinq.stag, "cvlans": ",".join(map(str, self.qinq.cvlans)),
                "qinq_ethtype": self.qinq.ethertype.value, "master": self.master, "saved": self.saved.describe()}


@dataclasses.dataclass(frozen=True)
class RestoreLinuxTap(Action):
    """Give Proxmox's tap back where Proxmox had plugged it; drop the agent's filters and mark."""

    port: str
    saved: Placement
    vmid: int | None = None
    reason: str = ""  # why now, when it is not the VM's own stop
    target: ClassVar[str] = NETLINK

    def sentence(self) -> str:
        return f"give {self.port} back to {self.saved.describe()}{because(self.reason)}"

    def details(self) -> dict[str, Any]:
        return {"saved": self.saved.describe(), "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class DelSVlanBridge(Action):
    """Remove the agent's devices of one S-VLAN once no QinQ tap uses them (checked again
    under the netdev lock when applied)."""

    bridge: str
    stag: int
    ethertype: str
    devices: tuple[str, ...]
    reason: str = ""
    target: ClassVar[str] = NETLINK

    def sentence(self) -> str:
        return f"remove {', '.join(self.devices)} (S-tag {self.stag} of {self.bridge}){because(self.reason)}"

    def details(self) -> dict[str, Any]:
        return {"stag": self.stag, "qinq_ethtype": self.ethertype, "devices": ",".join(self.devices),
                "reason": self.reason}
