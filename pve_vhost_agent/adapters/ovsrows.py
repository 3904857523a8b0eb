"""OVSDB IDL rows to state values, and actions to row changes inside one transaction.

Works on the rows of an `ovs.db.idl.Idl` without importing `ovs`: the adapter in
ovsdb.py owns the connection and the transaction. Writers check ownership again on
the rows they are about to change, so a plan that went stale between observing and
applying cannot make the agent touch a row it does not own.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from pve_vhost_agent.model.spec import is_decimal
from pve_vhost_agent.errors import NotFound, OvsRefused, OvsUnavailable, OwnershipError
from pve_vhost_agent.model.actions import (
    AddVhostPort, CheckVlanHeaders, DelPort, DropDatapath, EnsureBridge, EnsureDatapath, Action, ReplaceVhostPort, RestoreTapVlan,
    SetPortMtu, SetPortVlan, SetTapQinQ, SetVlanLimit,
)
from pve_vhost_agent.model.ovs import (
    MAX_VLAN_HEADERS, NIC, RESTART_FIX, OWNER, OWNS_BRIDGE, OWNS_DATAPATH, OWNS_PORT, OWNS_VLAN, QINQ_ETHTYPE, SAVED_VLAN, VHOST_CLIENT,
    VHOST_SERVER_PATH, VLAN_LIMIT_WAS, VMID, FrozenMap, OvsBridge, OvsInterface, OvsPort,
    OvsState, PortVlan,
)

# Tables and columns the agent reads or writes; nothing else is replicated.
COLUMNS: dict[str, tuple[str, ...]] = {
    "Open_vSwitch": ("bridges", "other_config", "external_ids", "iface_types", "datapaths", "next_cfg", "cur_cfg",
                     "dpdk_initialized", "dpdk_version"),
    "Bridge": ("name", "datapath_type", "ports", "external_ids"),
    "Port": ("name", "interfaces", "vlan_mode", "tag", "trunks", "cvlans", "other_config", "external_ids"),
    "Interface": (
        "name", "type", "options", "status", "external_ids", "ofport", "mtu", "mtu_request",
        "link_state", "admin_state", "error",
    ),
    "Datapath": ("datapath_version", "capabilities", "external_ids"),
}
VLAN_COLUMNS = ("vlan_mode", "tag", "trunks", "cvlans", "other_config")


def _one(value: Any, default: Any = None) -> Any:
    """An optional OVSDB column reads as a list of zero or one items."""
    return value[0] if value else default


def _col(row: Any, column: str, default: Any) -> Any:
    # Columns an older server lacks were not registered: read them as their default.
    return getattr(row, column, default)


def root_row(idl: Any, remote: str) -> Any:
    row = next(iter(idl.tables["Open_vSwitch"].rows.values()), None)
    if row is None:
        raise OvsUnavailable(
            f"the OVSDB at {remote} has no Open_vSwitch row",
            "initialise it (ovs-vsctl --no-wait init) or start openvswitch-switch",
        )
    return row


def row_vlan(row: Any) -> PortVlan:
    return PortVlan(
        mode=_one(row.vlan_mode, ""),
        tag=_one(row.tag),
        trunks=tuple(row.trunks),
        cvlans=tuple(_col(row, "cvlans", ())),
        qinq_ethtype=row.other_config.get(QINQ_ETHTYPE, ""),
    )


def _interface(row: Any) -> OvsInterface:
    return OvsInterface(
        name=row.name,
        type=row.type,
        options=FrozenMap(row.options),
        status=FrozenMap(row.status),
        external_ids=FrozenMap(row.external_ids),
        ofport=_one(row.ofport),
        mtu=_one(row.mtu),
        mtu_request=_one(row.mtu_request),
        link_state=_one(row.link_state, ""),
        admin_state=_one(row.admin_state, ""),
        error=_one(row.error, ""),
    )


def read_state(idl: Any, remote: str, port_bridges: Mapping[Any, str] | None = None) -> OvsState:
    """The replicated rows as values. `port_bridges` (port uuid -> bridge name) is given
    when Bridge.ports is not replicated (a connection scoped to some ports)."""
    root = root_row(idl, remote)
    bridge_of: dict[Any, str] = dict(port_bridges or {})
    bridges = []
    for row in idl.tables["Bridge"].rows.values():
        bridges.append(OvsBridge(row.name, row.datapath_type, FrozenMap(row.external_ids)))
        if port_bridges is None:
            for port in row.ports:
                bridge_of[port.uuid] = row.name
    ports = [
        OvsPort(row.name, bridge_of.get(row.uuid, ""), row_vlan(row), FrozenMap(row.external_ids),
                tuple(_interface(i) for i in row.interfaces))
        for row in idl.tables["Port"].rows.values()
    ]
    probed, dp_owners = {}, {}
    for dp_type, dp_row in _col(root, "datapaths", {}).items():
        headers = _col(dp_row, "capabilities", {}).get(MAX_VLAN_HEADERS)
        if headers is not None:
            probed[dp_type] = headers
        dp_owners[dp_type] = _col(dp_row, "external_ids", {}).get(OWNER, "")
    return OvsState(
        bridges=tuple(sorted(bridges, key=lambda b: b.name)),
        ports=tuple(sorted(ports, key=lambda p: p.name)),
        other_config=FrozenMap(root.other_config),
        external_ids=FrozenMap(root.external_ids),
        iface_types=tuple(sorted(root.iface_types)),
        probed_vlan_headers=FrozenMap(probed),
        datapath_owners=FrozenMap(dp_owners),
        next_cfg=root.next_cfg,
        cur_cfg=root.cur_cfg,
        dpdk_initialized=_col(root, "dpdk_initialized", None),
        dpdk_version=_one(_col(root, "dpdk_version", []), ""),
    )


class TxnView:
    """The rows of one open transaction, found by name. Each lookup table is made when a
    writer first needs it: a bridge's `ports` column alone turns thousands of uuids into rows."""

    def __init__(self, idl: Any, txn: Any, remote: str, port_bridges: Mapping[Any, str] | None = None):
        self.idl = idl
        self.txn = txn
        self.root = root_row(idl, remote)
        self._port_bridges = port_bridges

    @functools.cached_property
    def bridges(self) -> dict[str, Any]:
        return {r.name: r for r in self.idl.tables["Bridge"].rows.values()}

    @functools.cached_property
    def ports(self) -> dict[str, Any]:
        return {r.name: r for r in self.idl.tables["Port"].rows.values()}

    @functools.cached_property
    def bridge_of(self) -> dict[Any, Any]:
        if self._port_bridges is None:
            return {p.uuid: b for b in self.bridges.values() for p in b.ports}
        return {port: self.bridges[name] for port, name in self._port_bridges.items() if name in self.bridges}

    def insert(self, table: str, **columns: Any) -> Any:
        row = self.txn.insert(self.idl.tables[table])
        for column, value in columns.items():
            setattr(row, column, value)
        return row


def write(view: TxnView, action: Action) -> None:
    """Add `action`'s row changes to the open transaction."""
    _WRITERS[type(action)](view, action)


def _owned_port(view: TxnView, name: str, owns: str, *, missing_ok: bool) -> Any:
    row = view.ports.get(name)
    if row is None:
        if missing_ok:
            return None
        raise NotFound(f"Open vSwitch has no port {name}", "it was removed meanwhile; run the command again")
    row.verify("external_ids")
    owner = row.external_ids.get(OWNER, "")
    if owner != owns and not (owns == OWNS_VLAN and owner == ""):
        raise OwnershipError(
            f"OVS port {name} is not the agent's to change (external_ids {OWNER}={owner or 'unset'})",
            "leave it alone or remove it by hand (ovs-vsctl del-port) if it is stale",
        )
    return row


def _write_vlan(row: Any, vlan: PortVlan) -> None:
    row.vlan_mode = [vlan.mode] if vlan.mode else []
    row.tag = [] if vlan.tag is None else [vlan.tag]
    row.trunks = list(vlan.trunks)
    row.cvlans = list(vlan.cvlans)
    if vlan.qinq_ethtype:
        row.setkey("other_config", QINQ_ETHTYPE, vlan.qinq_ethtype)
    elif QINQ_ETHTYPE in row.other_config:
        row.delkey("other_config", QINQ_ETHTYPE)


def _set_vlan_limit(view: TxnView, a: SetVlanLimit) -> None:
    # The plan was made for these bridges and this limit: a concurrent change is TRY_AGAIN.
    view.root.verify("bridges")
    view.root.verify("other_config")
    view.root.setkey("other_config", "vlan-limit", str(a.limit))
    view.root.setkey("external_ids", VLAN_LIMIT_WAS, a.was)


def _ensure_datapath(view: TxnView, a: EnsureDatapath) -> None:
    view.root.verify("datapaths")  # a concurrent insert for the same type: TRY_AGAIN
    rows = dict(view.root.datapaths)
    if a.datapath_type not in rows:
        rows[a.datapath_type] = view.insert("Datapath", datapath_version="", external_ids={OWNER: OWNS_DATAPATH})
        view.root.datapaths = rows


def _drop_datapath(view: TxnView, a: DropDatapath) -> None:
    view.root.verify("datapaths")
    rows = dict(view.root.datapaths)
    row = rows.get(a.datapath_type)
    if row is not None and row.external_ids.get(OWNER) == OWNS_DATAPATH and not row.capabilities:
        del rows[a.datapath_type]  # not a root table: OVSDB drops the row with its last reference
        view.root.datapaths = rows


def _check_vlan_headers(view: TxnView, a: CheckVlanHeaders) -> None:
    row = dict(view.root.datapaths).get(a.datapath_type)
    text = row.capabilities.get(MAX_VLAN_HEADERS, "") if row is not None else ""
    if not is_decimal(text):
        raise OvsRefused(f"QinQ needs two VLAN headers, but ovs-vswitchd does not report the depth its "
                         f"{a.datapath_type} datapath was probed with", RESTART_FIX)
    if int(text) < a.needed:
        raise OvsRefused(f"QinQ needs {a.needed} VLAN headers, but the {a.datapath_type} datapath was probed "
                         f"with {text} (other_config:vlan-limit was changed after ovs-vswitchd created it)",
                         RESTART_FIX)


def _ensure_bridge(view: TxnView, a: EnsureBridge) -> None:
    row = view.bridges.get(a.bridge)
    if row is not None:
        if (row.datapath_type or "system") != a.datapath_type:
            raise OvsRefused(f"bridge {a.bridge} exists with datapath_type={row.datapath_type or 'system'}",
                             f"use a {a.datapath_type} bridge")
        return
    # Like `ovs-vsctl add-br`: the bridge's own internal port and interface.
    iface = view.insert("Interface", name=a.bridge, type="internal")
    port = view.insert("Port", name=a.bridge, interfaces=[iface])
    bridge = view.insert("Bridge", name=a.bridge, datapath_type=a.datapath_type, external_ids={OWNER: OWNS_BRIDGE})
    bridge.addvalue("ports", port)  # a mutation: also where Bridge.ports is not replicated
    # Two starts adding the same bridge at once: the second gets TRY_AGAIN (and then finds
    # the bridge) instead of an ERROR from the unique name index.
    view.root.verify("bridges")
    view.root.addvalue("bridges", bridge)
    view.bridges[a.bridge] = bridge


def _add_vhost_port(view: TxnView, a: AddVhostPort) -> None:
    ids = {OWNER: OWNS_PORT, VMID: str(a.vmid), NIC: a.nic}
    existing = view.ports.get(a.port)
    if existing is not None:
        if {k: existing.external_ids.get(k) for k in ids} == ids:
            return  # added meanwhile by another run of the agent for the same NIC
        raise OwnershipError(f"OVS port {a.port} appeared meanwhile and is not the agent's",
                             f"remove it (ovs-vsctl del-port {a.port}) if it is stale")
    bridge = view.bridges.get(a.bridge)
    if bridge is None:
        raise NotFound(f"Open vSwitch bridge {a.bridge} does not exist", "run the command again to create it")
    iface = view.insert("Interface", name=a.port, type=VHOST_CLIENT,
                        options={VHOST_SERVER_PATH: a.socket}, external_ids=ids)
    if a.mtu is not None:
        iface.mtu_request = [a.mtu]
    other = {QINQ_ETHTYPE: a.vlan.qinq_ethtype} if a.vlan.qinq_ethtype else {}
    port = view.insert("Port", name=a.port, interfaces=[iface], external_ids=ids, other_config=other,
                       vlan_mode=[a.vlan.mode] if a.vlan.mode else [],
                       tag=[] if a.vlan.tag is None else [a.vlan.tag],
                       trunks=list(a.vlan.trunks), cvlans=list(a.vlan.cvlans))
    bridge.addvalue("ports", port)
    view.ports[a.port] = port


def _set_port_vlan(view: TxnView, a: SetPortVlan) -> None:
    _write_vlan(_owned_port(view, a.port, OWNS_PORT, missing_ok=False), a.vlan)


def _set_port_mtu(view: TxnView, a: SetPortMtu) -> None:
    row = _owned_port(view, a.port, OWNS_PORT, missing_ok=False)
    for iface in row.interfaces:
        iface.mtu_request = [] if a.mtu is None else [a.mtu]


def _set_tap_qinq(view: TxnView, a: SetTapQinQ) -> None:
    row = _owned_port(view, a.port, OWNS_VLAN, missing_ok=False)
    for column in VLAN_COLUMNS:
        row.verify(column)
    if row.external_ids.get(OWNER) != OWNS_VLAN:
        # Save what the port has now (Proxmox's settings), not what the plan saw.
        row.setkey("external_ids", SAVED_VLAN, row_vlan(row).to_json())
    row.setkey("external_ids", OWNER, OWNS_VLAN)
    row.setkey("external_ids", VMID, str(a.vmid))
    row.setkey("external_ids", NIC, a.nic)
    _write_vlan(row, a.vlan)


def _restore_tap_vlan(view: TxnView, a: RestoreTapVlan) -> None:
    row = _owned_port(view, a.port, OWNS_VLAN, missing_ok=True)
    if row is None or row.external_ids.get(OWNER) != OWNS_VLAN:
        return  # gone, or re-plugged by Proxmox with its own settings: nothing to undo
    # The action's value is what was shown (plan, --dry-run, log): write that or nothing.
    saved = PortVlan.from_json(row.external_ids.get(SAVED_VLAN, "")) or PortVlan()
    if saved != a.vlan:
        raise OwnershipError(f"OVS port {a.port} now saves VLAN settings ({saved}) other than the planned ({a.vlan})",
                             "run the command again (it plans from the port as it is now)")
    _write_vlan(row, a.vlan)
    for key in (OWNER, VMID, NIC, SAVED_VLAN):
        row.delkey("external_ids", key)


def _del_port(view: TxnView, a: DelPort | ReplaceVhostPort) -> None:
    row = _owned_port(view, a.port, OWNS_PORT, missing_ok=True)
    if row is None:
        return
    # Port and Interface are not root tables: OVSDB drops them once no bridge lists them.
    bridge = view.bridge_of.get(row.uuid)
    if bridge is not None:
        bridge.delvalue("ports", row)
    row.delete()
    del view.ports[a.port]


_WRITERS: dict[type, Callable[[TxnView, Any], None]] = {
    SetVlanLimit: _set_vlan_limit,
    EnsureDatapath: _ensure_datapath,
    DropDatapath: _drop_datapath,
    CheckVlanHeaders: _check_vlan_headers,
    EnsureBridge: _ensure_bridge,
    AddVhostPort: _add_vhost_port,
    ReplaceVhostPort: _del_port,  # the add follows in the next step (see Ovsdb.apply)
    SetPortVlan: _set_port_vlan,
    SetPortMtu: _set_port_mtu,
    SetTapQinQ: _set_tap_qinq,
    RestoreTapVlan: _restore_tap_vlan,
    DelPort: _del_port,
}
