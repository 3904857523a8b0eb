"""vhost-user ports made by the agent on a private OVS-DPDK (pre-start and post-stop steps)."""

import time

import pytest

from pve_vhost_agent.errors import OwnershipError
from pve_vhost_agent.model.actions import AddVhostPort, DelPort, EnsureBridge, ReplaceVhostPort, SetPortVlan
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ovs import plan_vhost_ports, plan_vm_removal
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import Backend, EtherType, QinQ, VhostNic, VlanPolicy, VmSpec

BRIDGE = "h3vh0"


@pytest.fixture
def dpdk(ovs_dpdk):
    """The session's OVS-DPDK and a connection; the test's bridge is removed afterwards."""
    with Ovsdb(ovs_dpdk.remote, timeout=10) as db:
        yield ovs_dpdk, db
    ovs_dpdk.vsctl("--if-exists", "del-br", BRIDGE)


def nic(index=0, vmid=100, **kw):
    return VhostNic(vmid, index, BRIDGE, f"02:00:00:00:{vmid % 100:02d}:{index:02d}", **kw)


def settle(db: Ovsdb, port: str, ready) -> OvsState:
    """Poll snapshots until `ready(interface)`: vswitchd fills Interface.status on its own time."""
    deadline = time.monotonic() + 10
    while True:
        state = db.snapshot()
        iface = state.port(port).interface
        if ready(iface) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def test_pre_start_makes_a_vhost_user_client_port_waiting_for_qemu(dpdk, ovs_tmp):
    ovs, db = dpdk
    sockets = Settings(root=ovs_tmp).socket_dir("ovs")
    spec = VmSpec(100, (nic(vlan=VlanPolicy(qinq=QinQ(950, (10,), EtherType.DOT1Q)), mtu=9000),))
    plan = plan_vhost_ports(spec, db.snapshot(), sockets)
    assert [type(a) for a in plan] == [EnsureBridge, AddVhostPort]
    db.apply(plan)
    assert plan_vhost_ports(spec, db.snapshot(), sockets) == ()

    socket = f"{ovs_tmp}/run/pve-vhost-agent/ovs/vm-100-0.sock"
    assert ovs.get("Interface", "vhu100i0", "type", "options", "mtu_request") == {
        "type": "dpdkvhostuserclient", "options": {"vhost-server-path": socket}, "mtu_request": 9000}
    assert ovs.get("Bridge", BRIDGE, "datapath_type")["datapath_type"] == "netdev"
    iface = settle(db, "vhu100i0", lambda i: "mode" in i.status).port("vhu100i0").interface
    # No QEMU listens yet: OVS keeps trying to connect as the client.
    assert (iface.status.get("mode"), iface.status.get("status")) == ("client", "disconnected")
    assert iface.error == "" and iface.ofport > 0
    assert f"vHost User device 'vhu100i0' created in 'client' mode, using client socket '{socket}'" in ovs.log()


def test_a_new_socket_folder_replaces_the_port_in_vswitchd(dpdk, ovs_tmp):
    ovs, db = dpdk
    spec = VmSpec(100, (nic(),))
    db.apply(plan_vhost_ports(spec, db.snapshot(), ovs_tmp / "old"))
    old_uuid = ovs.get("Interface", "vhu100i0", "_uuid")["_uuid"]

    plan = plan_vhost_ports(spec, db.snapshot(), ovs_tmp / "new")
    assert [type(a) for a in plan] == [ReplaceVhostPort]
    db.apply(plan)
    # OVS ignores a changed vhost-server-path on a registered port: it must be a new one.
    assert ovs.get("Interface", "vhu100i0", "_uuid")["_uuid"] != old_uuid
    ovs.wait_for_log(f"using client socket '{ovs_tmp}/new/vm-100-0.sock'")
    assert plan_vhost_ports(spec, db.snapshot(), ovs_tmp / "new") == ()


def test_vlan_and_mtu_changes_keep_the_port(dpdk, ovs_tmp):
    ovs, db = dpdk
    db.apply(plan_vhost_ports(VmSpec(100, (nic(vlan=VlanPolicy(tag=10)),)), db.snapshot(), ovs_tmp))
    iface_uuid = ovs.get("Interface", "vhu100i0", "_uuid")
    spec = VmSpec(100, (nic(vlan=VlanPolicy(trunks=(20, 21)), mtu=1400),))
    plan = plan_vhost_ports(spec, db.snapshot(), ovs_tmp)
    assert [type(a).__name__ for a in plan] == ["SetPortVlan", "SetPortMtu"]
    db.apply(plan)
    assert ovs.get("Port", "vhu100i0", "vlan_mode", "tag", "trunks") == {"vlan_mode": "trunk", "tag": [], "trunks": [20, 21]}
    # The same interface row: no reconnect for the VM. (OVS applies the MTU once QEMU connects.)
    assert ovs.get("Interface", "vhu100i0", "_uuid", "mtu_request") == {**iface_uuid, "mtu_request": 1400}


def test_post_stop_removes_only_that_vms_ports(dpdk, ovs_tmp):
    ovs, db = dpdk
    db.apply(plan_vhost_ports(VmSpec(100, (nic(0), nic(1))), db.snapshot(), ovs_tmp))
    db.apply(plan_vhost_ports(VmSpec(101, (nic(0, 101),)), db.snapshot(), ovs_tmp))
    ovs.vsctl("add-port", BRIDGE, "vhu100i7", "--", "set", "Interface", "vhu100i7", "type=internal")  # not the agent's
    plan = plan_vm_removal(100, db.snapshot())
    assert plan == (DelPort("vhu100i0", BRIDGE, 100), DelPort("vhu100i1", BRIDGE, 100))
    db.apply(plan)
    assert ovs.find("Port", f"name!={BRIDGE}") == ["vhu100i7", "vhu101i0"]
    assert ovs.find("Interface", "type=dpdkvhostuserclient") == ["vhu101i0"]
    assert plan_vm_removal(100, db.snapshot()) == ()


def test_a_foreign_port_under_the_nics_name_is_refused_not_taken_over(dpdk, ovs_tmp):
    ovs, db = dpdk
    ovs.vsctl("add-br", BRIDGE, "--", "set", "Bridge", BRIDGE, "datapath_type=netdev")
    ovs.vsctl("add-port", BRIDGE, "vhu100i0", "--", "set", "Interface", "vhu100i0", "type=internal")
    before = ovs.get("Port", "vhu100i0", "_uuid", "external_ids", "interfaces")
    with pytest.raises(OwnershipError) as caught:
        plan_vhost_ports(VmSpec(100, (nic(),)), db.snapshot(), ovs_tmp)
    assert str(caught.value) == (
        "VM 100 net0 needs OVS port vhu100i0, but that port is not the agent's (no pve-vhost-agent "
        "external_ids); remove or rename that port (ovs-vsctl del-port vhu100i0) if it is stale; "
        "the agent never takes over ports")
    assert ovs.get("Port", "vhu100i0", "_uuid", "external_ids", "interfaces") == before


def test_external_backend_nics_leave_ovs_alone(dpdk, ovs_tmp):
    ovs, db = dpdk
    spec = VmSpec(100, (nic(backend=Backend.EXTERNAL),))
    assert plan_vhost_ports(spec, db.snapshot(), ovs_tmp) == ()
    assert ovs.find("Bridge", f"name={BRIDGE}") == []


def test_a_stale_plan_cannot_touch_a_port_that_changed_hands(dpdk, ovs_tmp):
    ovs, db = dpdk
    db.apply(plan_vhost_ports(VmSpec(100, (nic(),)), db.snapshot(), ovs_tmp))
    stale = plan_vhost_ports(VmSpec(100, (nic(vlan=VlanPolicy(tag=5)),)), db.snapshot(), ovs_tmp)
    assert stale == (SetPortVlan("vhu100i0", stale[0].vlan, 100),)
    # Someone takes the port over between the agent's observing and applying.
    ovs.vsctl("set", "Port", "vhu100i0", "external_ids={}")
    with pytest.raises(OwnershipError, match="vhu100i0 is not the agent's"):
        db.apply(stale)
    assert ovs.get("Port", "vhu100i0", "tag") == {"tag": []}
