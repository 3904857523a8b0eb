"""The changes the agent makes, as small frozen values named verb + noun.

A plan is a tuple of these. Each one says itself in two ways, and only these:
- `sentence()`: one short line for people (the task log of a Proxmox start, the
  service's log, `--dry-run`, `status`), in the words `nic list` uses;
- `fields()`: plain values for journald and `--json` (ACTION, VMID, NIC, PORT, BRIDGE and
  the details), never a repr.
`repr()` stays the exact value for tests. Which adapter applies an action is its
`target` (OVSDB, files, netlink); `barrier` marks an OVS change the next one depends on
(ovs-vswitchd must have applied it first).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from pve_vhost_agent.model.ovs import PortVlan
from pve_vhost_agent.model.spec import QinQ, VlanPolicy

if TYPE_CHECKING:  # field types only: a start without QinQ taps on Linux bridges never loads them
    from pve_vhost_agent.model.netdevs import Placement, SVlanBridge

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


def _because(reason: str) -> str:
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
        return f"give {self.port} back Proxmox's VLAN settings: {self.vlan.describe()}{_because(self.reason)}"

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
        return f"remove vhost-user port {self.port} from {self.bridge or 'Open vSwitch'}{_because(self.reason)}"

    def details(self) -> dict[str, Any]:
        return {"reason": self.reason}


# --- Linux bridges (netlink) ---------------------------------------------------------------


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
        return f"give {self.port} back to {self.saved.describe()}{_because(self.reason)}"

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
        return f"remove {', '.join(self.devices)} (S-tag {self.stag} of {self.bridge}){_because(self.reason)}"

    def details(self) -> dict[str, Any]:
        return {"stag": self.stag, "qinq_ethtype": self.ethertype, "devices": ",".join(self.devices),
                "reason": self.reason}


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


# --- a running QEMU ---------------------------------------------------------------------


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
        return f"disconnect link {self.nic}{_because(self.reason)}"

    def details(self) -> dict[str, Any]:
        return {"netdevs": ",".join(self.netdevs), "reason": self.reason}


OVS_ACTIONS = (SetVlanLimit, EnsureDatapath, DropDatapath, CheckVlanHeaders, EnsureBridge, AddVhostPort,
               ReplaceVhostPort, SetPortVlan, SetPortMtu, SetTapQinQ, RestoreTapVlan, DelPort)
