"""Open vSwitch as the agent observed it: frozen values read from OVSDB, no I/O here.

The ownership vocabulary lives here too, because planner and adapter both read it:
every row the agent creates or changes carries `external_ids` under the `pve-vhost-agent:`
prefix, saying what the agent owns of it, for which VM and NIC.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Iterable, Iterator, Mapping

from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.model.spec import EtherType, QinQ, VlanPolicy, format_vlan_list, is_decimal

PREFIX = "pve-vhost-agent:"
OWNER = PREFIX + "owner"  # what the agent owns of the row: one of the OWNS_* values
VMID = PREFIX + "vmid"
NIC = PREFIX + "nic"  # `netN`
SAVED_VLAN = PREFIX + "saved-vlan"  # a tap port's VLAN settings before the agent changed them
VLAN_LIMIT_WAS = PREFIX + "vlan-limit-was"  # on the Open_vSwitch row, '' when it was unset

OWNS_BRIDGE = "bridge"  # a bridge the agent created
OWNS_DATAPATH = "datapath"  # a Datapath row the agent created (to read the probed VLAN depth)
OWNS_PORT = "port"  # a port (and its interface) the agent created: it may delete it
OWNS_VLAN = "vlan"  # only the VLAN columns of someone else's port (Proxmox's tap)

QINQ_ETHTYPE = "qinq-ethtype"  # Port other_config key
MAX_VLAN_HEADERS = "max_vlan_headers"  # Datapath capabilities key
VHOST_CLIENT = "dpdkvhostuserclient"
VHOST_SERVER_PATH = "vhost-server-path"  # Interface options key
DEFAULT_VLAN_LIMIT = 1  # what ovs-vswitchd assumes when other_config:vlan-limit is absent
# The fix for a datapath probed with too few VLAN headers (planner and writer both say it).
RESTART_FIX = "restart ovs-vswitchd (systemctl restart openvswitch-switch), then start the VM again"


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable string map (OVSDB map columns), printed like a dict."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()):
        object.__setattr__(self, "_data", dict(sorted(dict(items).items())))

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._data)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("FrozenMap is immutable")


@dataclasses.dataclass(frozen=True)
class PortVlan:
    """The VLAN columns of an OVS Port. Empty values mean OVS's defaults."""

    mode: str = ""  # vlan_mode: access, trunk, native-tagged, native-untagged, dot1q-tunnel
    tag: int | None = None
    trunks: tuple[int, ...] = ()
    cvlans: tuple[int, ...] = ()
    qinq_ethtype: str = ""  # other_config:qinq-ethtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "trunks", tuple(sorted(set(self.trunks))))
        object.__setattr__(self, "cvlans", tuple(sorted(set(self.cvlans))))

    def __str__(self) -> str:
        parts = [self.mode or "default"]
        if self.tag is not None:
            parts.append(f"tag={self.tag}")
        for name, vids in (("trunks", self.trunks), ("cvlans", self.cvlans)):
            if vids:
                parts.append(f"{name}={','.join(map(str, vids))}")
        if self.qinq_ethtype:
            parts.append(f"{QINQ_ETHTYPE}={self.qinq_ethtype}")
        return " ".join(parts)

    def describe(self) -> str:
        """In the words `nic list` uses (VlanPolicy.describe) where the columns say a declared
        mode; Proxmox's own modes (native-untagged, ...) by their OVS name."""
        policy = self.as_policy()
        if policy is not None:
            return policy.describe()
        parts = [self.mode] if self.mode else []
        if self.tag is not None:
            parts.append(f"VLAN tag {self.tag}")
        if self.trunks:
            parts.append(f"trunks {format_vlan_list(self.trunks)}")
        return ", ".join(parts)

    def as_policy(self) -> VlanPolicy | None:
        """The declared VLAN mode these columns carry (None: a mode the agent never declares)."""
        try:
            if self.mode == "dot1q-tunnel" and self.tag is not None and not self.trunks:
                return VlanPolicy(qinq=QinQ(self.tag, self.cvlans, EtherType(self.qinq_ethtype or EtherType.DOT1AD.value)))
            if self.cvlans or self.qinq_ethtype:
                return None
            if self.mode in ("", "access") and self.tag is not None and not self.trunks:
                return VlanPolicy(tag=self.tag)
            if self.mode in ("", "trunk") and self.tag is None:
                return VlanPolicy(trunks=self.trunks)
        except (ValueError, AgentError):
            return None
        return None

    @classmethod
    def of_policy(cls, policy: VlanPolicy) -> "PortVlan":
        """The Port columns that carry a NIC's declared VLAN policy."""
        if policy.qinq:
            q = policy.qinq
            return cls("dot1q-tunnel", q.stag, (), q.cvlans, q.ethertype.value)
        if policy.tag is not None:
            return cls("access", policy.tag)
        if policy.trunks:
            return cls("trunk", None, policy.trunks)
        return cls()

    def to_json(self) -> str:
        """The compact form kept in `external_ids` (tap ports' saved settings)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "PortVlan | None":
        """None when `text` is not what `to_json` wrote (someone edited it)."""
        try:
            raw = json.loads(text)
            vlan = cls(
                mode=str(raw["mode"]),
                tag=None if raw["tag"] is None else int(raw["tag"]),
                trunks=tuple(int(v) for v in raw["trunks"]),
                cvlans=tuple(int(v) for v in raw["cvlans"]),
                qinq_ethtype=str(raw["qinq_ethtype"]),
            )
        except (ValueError, TypeError, KeyError):
            return None
        return vlan


@dataclasses.dataclass(frozen=True)
class OvsInterface:
    """An OVS Interface row: the columns the agent reads."""

    name: str
    type: str = ""
    options: FrozenMap = FrozenMap()
    status: FrozenMap = FrozenMap()
    external_ids: FrozenMap = FrozenMap()
    ofport: int | None = None
    mtu: int | None = None
    mtu_request: int | None = None
    link_state: str = ""
    admin_state: str = ""
    error: str = ""

    @property
    def socket_path(self) -> str:
        return self.options.get(VHOST_SERVER_PATH, "")


@dataclasses.dataclass(frozen=True)
class OvsPort:
    """An OVS Port row with its bridge, VLAN settings and interfaces."""

    name: str
    bridge: str = ""  # '' when no bridge lists the port
    vlan: PortVlan = PortVlan()
    external_ids: FrozenMap = FrozenMap()
    interfaces: tuple[OvsInterface, ...] = ()

    @property
    def owner(self) -> str:
        """What the agent owns of this port ('' when nothing: a foreign port)."""
        return self.external_ids.get(OWNER, "")

    @property
    def vmid(self) -> int | None:
        text = self.external_ids.get(VMID, "")
        return int(text) if is_decimal(text) else None

    @property
    def nic(self) -> str:
        return self.external_ids.get(NIC, "")

    @property
    def saved_vlan(self) -> PortVlan | None:
        return PortVlan.from_json(self.external_ids.get(SAVED_VLAN, ""))

    @property
    def interface(self) -> OvsInterface | None:
        """The port's interface when it has exactly one (all ports the agent deals with)."""
        return self.interfaces[0] if len(self.interfaces) == 1 else None


@dataclasses.dataclass(frozen=True)
class OvsBridge:
    """An OVS Bridge row: the columns the agent reads."""

    name: str
    datapath_type: str = ""  # '' means `system` (the kernel datapath)
    external_ids: FrozenMap = FrozenMap()

    @property
    def datapath(self) -> str:
        return self.datapath_type or "system"


@dataclasses.dataclass(frozen=True)
class OvsState:
    """One consistent reading of the Open_vSwitch database."""

    bridges: tuple[OvsBridge, ...] = ()
    ports: tuple[OvsPort, ...] = ()
    other_config: FrozenMap = FrozenMap()  # of the Open_vSwitch row
    external_ids: FrozenMap = FrozenMap()
    iface_types: tuple[str, ...] = ()  # '' until ovs-vswitchd has run once
    # VLAN headers each datapath type was probed with, when a Datapath row reports it.
    probed_vlan_headers: FrozenMap = FrozenMap()
    # Datapath rows by datapath type: their owner mark ('' for a row someone else made).
    datapath_owners: FrozenMap = FrozenMap()
    next_cfg: int = 0
    cur_cfg: int = 0
    dpdk_initialized: bool | None = None  # None: the server's schema has no such column
    dpdk_version: str = ""  # "DPDK 22.11.11" from a DPDK build of ovs-vswitchd, "none" from another

    # Lookups by name: a pass over hundreds of VMs must not scan every port for each.
    @functools.cached_property
    def _bridges(self) -> dict[str, OvsBridge]:
        return {b.name: b for b in self.bridges}

    @functools.cached_property
    def _ports(self) -> dict[str, OvsPort]:
        return {p.name: p for p in self.ports}

    @functools.cached_property
    def _owned(self) -> dict[int | None, tuple[OvsPort, ...]]:
        owned: dict[int | None, list[OvsPort]] = {}
        for port in self.ports:
            if port.owner in (OWNS_PORT, OWNS_VLAN):
                owned.setdefault(port.vmid, []).append(port)
        return {vmid: tuple(ports) for vmid, ports in owned.items()}

    def bridge(self, name: str) -> OvsBridge | None:
        return self._bridges.get(name)

    def port(self, name: str) -> OvsPort | None:
        return self._ports.get(name)

    @property
    def vlan_limit(self) -> int:
        """The effective vlan-limit (0 means no limit beyond the datapath's)."""
        text = self.other_config.get("vlan-limit", "")
        return int(text) if is_decimal(text) else DEFAULT_VLAN_LIMIT

    def datapaths_in_use(self) -> tuple[str, ...]:
        return tuple(sorted({b.datapath for b in self.bridges}))

    def probed_headers(self, datapath: str) -> int | None:
        text = self.probed_vlan_headers.get(datapath, "")
        return int(text) if is_decimal(text) else None

    def owned_ports(self, vmid: int | None = None) -> tuple[OvsPort, ...]:
        """Ports the agent created or changed, optionally only those of VM `vmid`."""
        if vmid is not None:
            return self._owned.get(vmid, ())
        return tuple(p for ports in self._owned.values() for p in ports)


def port_report(port: OvsPort) -> dict:
    """What `status` and the post-start check show of a port, as plain JSON-able values."""
    iface = port.interface or OvsInterface(port.name)
    saved = port.saved_vlan if port.owner == OWNS_VLAN else None
    return {
        "port": port.name,
        "bridge": port.bridge,
        "owner": port.owner,
        "vmid": port.vmid,
        "nic": port.nic,
        "type": iface.type or "system",
        "socket": iface.socket_path or None,
        "vlan": port.vlan.describe(),
        "vlan_mode": port.vlan.mode or None,
        "tag": port.vlan.tag,
        "trunks": list(port.vlan.trunks),
        "cvlans": list(port.vlan.cvlans),
        "qinq_ethtype": port.vlan.qinq_ethtype or None,
        "saved_vlan": saved.describe() if saved else None,
        "ofport": iface.ofport,
        "link_state": iface.link_state or None,
        "admin_state": iface.admin_state or None,
        "vhost_mode": iface.status.get("mode"),
        "vhost_status": iface.status.get("status"),
        "error": iface.error or None,
    }
