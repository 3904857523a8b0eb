"""The changes the agent makes to Open vSwitch, as small frozen values.

A plan is a tuple of these; `repr()` shows every field, so a plan can be printed
(`--dry-run`), logged and compared in tests. Only `ovsdb.Ovsdb.apply` turns them into
OVSDB writes.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Union

from pve_vhost_agent.model.ovs import PortVlan


@dataclasses.dataclass(frozen=True)
class SetVlanLimit:
    """Open_vSwitch other_config:vlan-limit, so datapaths probe two VLAN headers (QinQ)."""

    limit: int
    was: str  # the value before ('' when unset), kept in external_ids
    # ovs-vswitchd must have read it before the next step creates a datapath.
    barrier: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class EnsureDatapath:
    """The agent's own Datapath row for this datapath type, so ovs-vswitchd reports the
    VLAN depth it probed (`capabilities:max_vlan_headers`); a foreign row is left alone."""

    datapath_type: str
    # ovs-vswitchd fills capabilities while applying the new row: the check reads them next.
    barrier: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class DropDatapath:
    """Remove the agent's Datapath row that ovs-vswitchd left empty (it was made before
    the datapath ran; ovs-vswitchd fills only a row new to it)."""

    datapath_type: str
    barrier: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class CheckVlanHeaders:
    """Stop the plan here unless the datapath reports at least `needed` VLAN headers."""

    datapath_type: str
    needed: int
    barrier: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class EnsureBridge:
    """A bridge with this datapath type (may exist: then nothing happens)."""

    bridge: str
    datapath_type: str
    barrier: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class AddVhostPort:
    """A dpdkvhostuserclient port of VM `vmid` NIC `nic`; QEMU serves `socket`."""

    port: str
    bridge: str
    vmid: int
    nic: str
    socket: str
    vlan: PortVlan
    mtu: int | None = None
    barrier: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class ReplaceVhostPort:
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


@dataclasses.dataclass(frozen=True)
class SetPortVlan:
    """New VLAN settings for a vhost-user port the agent owns."""

    port: str
    vlan: PortVlan
    barrier: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class SetPortMtu:
    """New mtu_request (None: OVS's default) for a vhost-user port the agent owns."""

    port: str
    mtu: int | None
    barrier: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class SetTapQinQ:
    """dot1q-tunnel on Proxmox's tap port; `saved` is what Proxmox gave it, for post-stop."""

    port: str
    vmid: int
    nic: str
    vlan: PortVlan
    saved: PortVlan
    barrier: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class RestoreTapVlan:
    """Give Proxmox's tap port back its own VLAN settings and drop the agent's marks."""

    port: str
    vlan: PortVlan
    barrier: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class DelPort:
    """Delete a port (and its interface) the agent created."""

    port: str
    bridge: str
    barrier: ClassVar[bool] = False


OvsAction = Union[
    SetVlanLimit, DropDatapath, EnsureDatapath, CheckVlanHeaders, EnsureBridge, AddVhostPort, ReplaceVhostPort, SetPortVlan, SetPortMtu,
    SetTapQinQ, RestoreTapVlan, DelPort,
]
