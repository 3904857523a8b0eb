"""The changes the agent makes, as small frozen values named verb + noun.

A plan is a tuple of these. Each one says itself in two ways, and only these:
- `sentence()`: one short line for people (the task log of a Proxmox start, the
  service's log, `--dry-run`, `status`), in the words `nic list` uses;
- `fields()`: plain values for journald and `--json` (ACTION, VMID, NIC, PORT, BRIDGE and
  the details), never a repr.
`repr()` stays the exact value for tests. Which adapter applies an action is its
`target` (OVSDB, files, netlink); `barrier` marks an OVS change the next one depends on
(ovs-vswitchd must have applied it first). The actions of QinQ on Linux bridges are in
model/lbactions.py and those of link ends in model/linkactions.py: a start loads them only
for a VM that has such NICs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from pve_vhost_agent.model.ovs import PortVlan


OVS = "ovs"  # through one OVSDB transaction per step
FILES = "files"  # folders, socket files and VM configs
NETLINK = "netlink"  # Linux links, bridge VLANs and tc filters (pyroute2), under the agent's netdev lock
QMP = "qmp"  # a running QEMU, through its QMP socket


@dataclasses.dataclass(frozen=True)
class Action:
    """One change the agent makes (see the module's note)."""

    target: ClassVar[str] = OVS
    barrier: ClassVar[bool] = False
    # The fields every action may have, in the order journald shows them.
    _SUBJECT: ClassVar[tuple[str, ...]] = ("vmid", "nic", "port", "bridge")

    def sentence(self) -> str:
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        """Fields beyond the subject (overridden where there are some)."""
        return {}

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": type(self).__name__}
        for name in self._SUBJECT:
            value = getattr(self, name, None)
            if value not in (None, ""):
                out[name] = value
        out.update({k: v for k, v in self.details().items() if v not in (None, "", ())})
        return out


def because(reason: str) -> str:
    return f" ({reason})" if reason else ""


def _vlan_fields(vlan: PortVlan) -> dict[str, Any]:
    return {"vlan_mode": vlan.mode, "tag": vlan.tag, "trunks": ",".join(map(str, vlan.trunks)),
            "cvlans": ",".join(map(str, vlan.cvlans)), "qinq_ethtype": vlan.qinq_ethtype}


# --- Open vSwitch ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SetVlanLimit(Action):
    """Open_vSwitch other_config:vlan-limit, so datapaths probe two VLAN headers (QinQ)."""

    limit: int
    was: str  # the value before ('' when unset), kept in external_ids
    # ovs-vswitchd must have read it before the next step creates a datapath.
    barrier: ClassVar[bool] = True

    def sentence(self) -> str:
        return f"set Open vSwitch vlan-limit to {self.limit} (was {self.was or 'unset'}) for QinQ"

    def details(self) -> dict[str, Any]:
        return {"limit": self.limit, "was": self.was}


@dataclasses.dataclass(frozen=True)
class EnsureDatapath(Action):
    """The agent's own Datapath row for this datapath type, so ovs-vswitchd reports the
    VLAN depth it probed (`capabilities:max_vlan_headers`); a foreign row is left alone."""

    datapath_type: str
    # ovs-vswitchd fills capabilities while applying the new row: the check reads them next.
    barrier: ClassVar[bool] = True

    def sentence(self) -> str:
        return f"add a Datapath row for {self.datapath_type}, so ovs-vswitchd reports its VLAN depth"

    def details(self) -> dict[str, Any]:
        return {"datapath_type": self.datapath_type}


@dataclasses.dataclass(frozen=True)
class DropDatapath(Action):
    """Remove the agent's Datapath row that ovs-vswitchd left empty (it was made before
    the datapath ran; ovs-vswitchd fills only a row new to it)."""

    datapath_type: str
    barrier: ClassVar[bool] = True

    def sentence(self) -> str:
        return f"remove the agent's empty Datapath row for {self.datapath_type}"

    def details(self) -> dict[str, Any]:
        return {"datapath_type": self.datapath_type}


@dataclasses.dataclass(frozen=True)
class CheckVlanHeaders(Action):
    """Stop the plan here unless the datapath reports at least `needed` VLAN headers."""

    datapath_type: str
    needed: int

    def sentence(self) -> str:
        return f"check that the {self.datapath_type} datapath takes {self.needed} VLAN headers"

    def details(self) -> dict[str, Any]:
        return {"datapath_type": self.datapath_type, "needed": self.needed}


@dataclasses.dataclass(frozen=True)
class EnsureBridge(Action):
    """A bridge with this datapath type (may exist: then nothing happens)."""

    bridge: str
    datapath_type: str
    barrier: ClassVar[bool] = True

    def sentence(self) -> str:
        return f"create bridge {self.bridge} ({self.datapath_type} datapath)"

    def details(self) -> dict[str, Any]:
        return {"datapath_type": self.datapath_type}


@dataclasses.dataclass(frozen=True)
class AddVhostPort(Action):
    """A dpdkvhostuserclient port of VM `vmid` NIC `nic`; QEMU serves `socket`."""

    port: str
    bridge: str
    vmid: int
    nic: str
    socket: str
    vlan: PortVlan
    mtu: int | None = None

    def sentence(self) -> str:
        mtu = f", MTU {self.mtu}" if self.mtu is not None else ""
        return f"add vhost-user port {self.port} on {self.bridge}: {self.vlan.describe()}{mtu}"

    def details(self) -> dict[str, Any]:
        return {"socket": self.socket, **_vlan_fields(self.vlan), "mtu": self.mtu}


@dataclasses.dataclass(frozen=True)
class ReplaceVhostPort(Action):
    """Delete an owned vhost-user port, wait for ovs-vswitchd, add it again.

    OVS ignores a changed vhost-server-path (and a change of bridge is a new port), so
    the old port must be gone from ovs-vswitchd before the new one is added.
    """

    reason: str
    add: AddVhostPort
    barrier: ClassVar[bool] = True

    @property
    def port(self) -> str:
        return self.add.port

    @property
    def bridge(self) -> str:
        return self.add.bridge

    @property
    def vmid(self) -> int:
        return self.add.vmid

    @property
    def nic(self) -> str:
        return self.add.nic

    def sentence(self) -> str:
        return f"re-create vhost-user port {self.port} ({self.reason})"

    def details(self) -> dict[str, Any]:
        return {"reason": self.reason, **self.add.details()}


@dataclasses.dataclass(frozen=True)
class SetPortVlan(Action):
    """New VLAN settings for a vhost-user port the agent owns."""

    port: str
    vlan: PortVlan
    vmid: int | None = None

    def sentence(self) -> str:
        return f"set port {self.port} to {self.vlan.describe()}"

    def details(self) -> dict[str, Any]:
        return _vlan_fields(self.vlan)


@dataclasses.dataclass(frozen=True)
class SetPortMtu(Action):
    """New mtu_request (None: OVS's default) for a vhost-user port the agent owns."""

    port: str
    mtu: int | None
    vmid: int | None = None

    def sentence(self) -> str:
        return f"set port {self.port} to MTU {self.mtu}" if self.mtu else f"set port {self.port} to the default MTU"

    def details(self) -> dict[str, Any]:
        return {"mtu": self.mtu}


@dataclasses.dataclass(frozen=True)
class SetTapQinQ(Action):
    """dot1q-tunnel on Proxmox's tap port; `saved` is what Proxmox gave it, for post-stop."""

    port: str
    vmid: int
    nic: str
    vlan: PortVlan
    saved: PortVlan

    def sentence(self) -> str:
        return f"make Proxmox's {self.port} a QinQ port: {self.vlan.describe()}"

    def details(self) -> dict[str, Any]:
        return {**_vlan_fields(self.vlan), "saved_vlan": self.saved.describe()}


@dataclasses.dataclass(frozen=True)
class RestoreTapVlan(Action):
    """Give Proxmox's tap port back its own VLAN settings and drop the agent's marks."""

    port: str
    vlan: PortVlan
    vmid: int | None = None
    reason: str = ""  # why now, when it is not the VM's own stop

    def sentence(self) -> str:
        return f"give {self.port} back Proxmox's VLAN settings: {self.vlan.describe()}{because(self.reason)}"

    def details(self) -> dict[str, Any]:
        return {**_vlan_fields(self.vlan), "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class DelPort(Action):
    """Delete a port (and its interface) the agent created."""

    port: str
    bridge: str
    vmid: int | None = None
    reason: str = ""  # why now, when it is not the VM's own stop

    def sentence(self) -> str:
        return f"remove vhost-user port {self.port} from {self.bridge or 'Open vSwitch'}{because(self.reason)}"

    def details(self) -> dict[str, Any]:
        return {"reason": self.reason}


# --- files --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MakeSocketDir(Action):
    """A socket folder the agent owns: root's, mode 0755 (others may not plant sockets)."""

    path: str
    target: ClassVar[str] = FILES

    def sentence(self) -> str:
        return f"create socket folder {self.path}"

    def details(self) -> dict[str, Any]:
        return {"path": self.path}


@dataclasses.dataclass(frozen=True)
class DelSocket(Action):
    """A socket file QEMU left in the `ovs` socket folder (never the `external` one)."""

    vmid: int
    path: str
    target: ClassVar[str] = FILES

    def sentence(self) -> str:
        return f"remove stale socket {self.path}"

    def details(self) -> dict[str, Any]:
        return {"path": self.path}


@dataclasses.dataclass(frozen=True)
class WriteVmArgs(Action):
    """Write VM `vmid`'s args line as `apply` would (pending when it runs)."""

    vmid: int
    reason: str
    target: ClassVar[str] = FILES

    def sentence(self) -> str:
        return f"write VM {self.vmid}'s args line: {self.reason}"

    def details(self) -> dict[str, Any]:
        return {"reason": self.reason}


OVS_ACTIONS = (SetVlanLimit, EnsureDatapath, DropDatapath, CheckVlanHeaders, EnsureBridge, AddVhostPort,
               ReplaceVhostPort, SetPortVlan, SetPortMtu, SetTapQinQ, RestoreTapVlan, DelPort)
