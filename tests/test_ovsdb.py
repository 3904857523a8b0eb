"""The OVSDB adapter against a real ovsdb-server and ovs-vswitchd (userspace; DPDK where needed)."""

import socket
import time

import pytest

from pve_vhost_agent.errors import AgentTimeout, OvsRefused, OvsUnavailable, OwnershipError
from pve_vhost_agent.model.actions import AddVhostPort, DelPort, EnsureBridge, SetPortMtu, SetPortVlan
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ovs import plan_gc, plan_tap_qinq, plan_vhost_ports
from pve_vhost_agent.adapters.ovsrows import write
from pve_vhost_agent.model.ovs import PortVlan
from pve_vhost_agent.model.spec import EtherType, QinQ, TapQinQ, VhostNic, VlanPolicy, VmSpec

OWNER = "pve-vhost-agent:owner"
TUNNEL = PortVlan("dot1q-tunnel", 950, (), (10, 11), "802.1q")


@pytest.fixture
def db(ovs):
    with Ovsdb(ovs.remote, timeout=10) as conn:
        yield conn


@pytest.fixture
def bridge(ovs):
    """A netdev bridge made like an operator would; removed after the test."""
    name = "h3t0"
    ovs.vsctl("add-br", name, "--", "set", "Bridge", name, "datapath_type=netdev")
    yield name
    ovs.vsctl("--if-exists", "del-br", name)


def vhost(port="vhu100i0", bridge="h3t0", vlan=PortVlan(), mtu=None):
    return AddVhostPort(port, bridge, 100, "net0", f"/tmp/h3-sockets/{port}.sock", vlan, mtu)


def test_ensure_bridge_makes_a_netdev_bridge_and_may_exist(ovs, db):
    try:
        db.apply([EnsureBridge("h3e0", "netdev")])
        row = ovs.get("Bridge", "h3e0", "_uuid", "datapath_type", "external_ids")
        assert row["datapath_type"] == "netdev"
        assert row["external_ids"] == {OWNER: "bridge"}
        # apply returned only after ovs-vswitchd had made the bridge: its own port has an ofport.
        own = db.snapshot().port("h3e0").interface
        assert own.type == "internal" and own.ofport == 65534
        db.apply([EnsureBridge("h3e0", "netdev")])
        assert ovs.get("Bridge", "h3e0", "_uuid") == {"_uuid": row["_uuid"]}
    finally:
        ovs.vsctl("--if-exists", "del-br", "h3e0")


def test_ensure_bridge_leaves_an_existing_bridge_as_it_is(ovs, db, bridge):
    before = ovs.get("Bridge", bridge, "_uuid", "external_ids", "ports")
    db.apply([EnsureBridge(bridge, "netdev")])
    assert ovs.get("Bridge", bridge, "_uuid", "external_ids", "ports") == before
    with pytest.raises(OvsRefused, match="datapath_type=netdev"):
        db.apply([EnsureBridge(bridge, "system")])


def test_vhost_port_add_change_remove_with_ownership_marks(ovs, db, bridge):
    db.apply([vhost(vlan=TUNNEL, mtu=9000)])
    port = ovs.get("Port", "vhu100i0", "vlan_mode", "tag", "cvlans", "other_config", "external_ids")
    iface = ovs.get("Interface", "vhu100i0", "type", "options", "mtu_request", "external_ids")
    marks = {OWNER: "port", "pve-vhost-agent:vmid": "100", "pve-vhost-agent:nic": "net0"}
    assert port == {"vlan_mode": "dot1q-tunnel", "tag": 950, "cvlans": [10, 11],
                    "other_config": {"qinq-ethtype": "802.1q"}, "external_ids": marks}
    assert iface == {"type": "dpdkvhostuserclient", "options": {"vhost-server-path": "/tmp/h3-sockets/vhu100i0.sock"},
                     "mtu_request": 9000, "external_ids": marks}

    db.apply([SetPortVlan("vhu100i0", PortVlan("access", 30)), SetPortMtu("vhu100i0", None)])
    assert ovs.get("Port", "vhu100i0", "vlan_mode", "tag", "cvlans", "other_config") == {
        "vlan_mode": "access", "tag": 30, "cvlans": [], "other_config": {}}
    assert ovs.get("Interface", "vhu100i0", "mtu_request") == {"mtu_request": []}
    assert db.snapshot().port("vhu100i0").vlan == PortVlan("access", 30)

    db.apply([DelPort("vhu100i0", bridge)])
    assert ovs.find("Port", "name=vhu100i0") == [] and ovs.find("Interface", "name=vhu100i0") == []
    db.apply([DelPort("vhu100i0", bridge)])  # if-exists: a second removal is no error


def test_a_foreign_port_is_never_touched(ovs, db, bridge):
    ovs.vsctl("add-port", bridge, "vhu100i0", "tag=7", "--", "set", "Interface", "vhu100i0", "type=internal",
              "--", "set", "Port", "vhu100i0", "external_ids:iface-id=someone-else")
    columns = ("_uuid", "tag", "vlan_mode", "external_ids", "interfaces")
    before = ovs.get("Port", "vhu100i0", *columns)
    for action in (DelPort("vhu100i0", bridge), SetPortVlan("vhu100i0", TUNNEL), SetPortMtu("vhu100i0", 1500)):
        with pytest.raises(OwnershipError, match="vhu100i0 is not the agent's"):
            db.apply([action])
    assert plan_gc([], db.snapshot()) == ()
    assert ovs.get("Port", "vhu100i0", *columns) == before


def test_a_failed_step_applies_nothing_of_it(ovs, db, bridge):
    ovs.vsctl("add-port", bridge, "vhu100i1", "--", "set", "Interface", "vhu100i1", "type=internal")
    with pytest.raises(OwnershipError):
        db.apply([vhost("vhu100i0"), SetPortVlan("vhu100i1", TUNNEL)])
    assert ovs.find("Port", "name=vhu100i0") == []


def test_try_again_is_retried_on_fresh_rows(ovs, db, bridge):
    db.apply([vhost()])
    attempts = []

    def build(view):
        attempts.append(1)
        write(view, SetPortVlan("vhu100i0", PortVlan("access", 40)))  # verifies the ownership marks
        if len(attempts) == 1:
            # Another client changes the port between our read and our commit.
            ovs.vsctl("set", "Port", "vhu100i0", "external_ids:note=concurrent")

    assert db.transact(build, "test retry") is True
    assert len(attempts) == 2
    row = ovs.get("Port", "vhu100i0", "tag", "external_ids")
    assert row["tag"] == 40 and row["external_ids"]["note"] == "concurrent"


def test_ovsdb_refusing_a_transaction_is_an_error_not_a_retry(ovs, db, bridge):
    db.apply([vhost()])

    def build(view):
        # Port names are unique in OVSDB: a second row with the same name is refused.
        port = view.insert("Port", name="vhu100i0", interfaces=[view.insert("Interface", name="h3dup")])
        view.bridges[bridge].addvalue("ports", port)

    with pytest.raises(OvsUnavailable, match="refused test duplicate.*constraint violation"):
        db.transact(build, "test duplicate")
    assert ovs.find("Interface", "name=h3dup") == []


def test_unreachable_socket_is_one_clear_line_at_once(ovs_tmp):
    path = ovs_tmp / "db.sock"
    started = time.monotonic()
    with pytest.raises(OvsUnavailable) as caught:
        Ovsdb(f"unix:{path}", timeout=10).snapshot()
    assert time.monotonic() - started < 1
    assert str(caught.value) == (
        f"cannot reach OVSDB at unix:{path} (No such file or directory); "
        "is openvswitch-switch running? (systemctl status openvswitch-switch)")
    # A stale socket file (the server died) is refused at once too.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    try:
        with pytest.raises(OvsUnavailable, match="Connection refused"):
            Ovsdb(f"unix:{path}", timeout=10).snapshot()
    finally:
        stale.close()


def test_a_server_that_never_answers_is_given_up_on_in_time(ovs_tmp):
    path = ovs_tmp / "db.sock"
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(path))
    mute.listen(1)
    try:
        started = time.monotonic()
        with pytest.raises(OvsUnavailable, match=r"cannot reach OVSDB .*took longer than 0.5 s"):
            Ovsdb(f"unix:{path}", timeout=0.5).snapshot()
        assert time.monotonic() - started < 2
    finally:
        mute.close()


def test_vswitchd_not_applying_is_a_timeout_naming_the_step(fresh_ovs):
    inst = fresh_ovs("nosw")
    inst.appctl("exit")  # ovsdb-server stays, ovs-vswitchd is gone
    with Ovsdb(inst.remote, timeout=1) as conn:
        started = time.monotonic()
        with pytest.raises(AgentTimeout) as caught:
            conn.apply([EnsureBridge("h3n0", "netdev")])
        assert time.monotonic() - started < 3
    assert str(caught.value).startswith(
        "ovs-vswitchd did not apply EnsureBridge h3n0 within 1 s (cur_cfg 0 < next_cfg 1): "
        f"ovs-vswitchd is not running (no live process in {inst.run_dir}/ovs-vswitchd.pid); see systemctl status")


def test_vlan_limit_is_set_before_the_qinq_bridge_exists(fresh_ovs, ovs_tmp):
    inst = fresh_ovs("vlim", dpdk=True)  # a host where vlan-limit was never set
    nic = VhostNic(100, 0, "h3v0", "02:00:00:00:00:01", vlan=VlanPolicy(qinq=QinQ(950, (), EtherType.DOT1AD)))
    spec = VmSpec(100, (nic,))
    sockets = ovs_tmp
    with Ovsdb(inst.remote, timeout=10) as conn:
        plan = plan_vhost_ports(spec, conn.snapshot(), sockets)
        assert [type(a).__name__ for a in plan] == ["SetVlanLimit", "EnsureBridge", "AddVhostPort"]
        conn.apply(plan)
        assert plan_vhost_ports(spec, conn.snapshot(), sockets) == ()
    log = inst.log()
    assert "VLAN header stack length probed as 2" in log and "length probed as 1" not in log
    root = inst.get("Open_vSwitch", ".", "other_config", "external_ids")
    assert root["other_config"]["vlan-limit"] == "2"
    assert root["external_ids"] == {"pve-vhost-agent:vlan-limit-was": ""}


def test_qinq_is_refused_once_a_datapath_probed_one_vlan_header(fresh_ovs):
    inst = fresh_ovs("vone")
    inst.vsctl("add-br", "h3o0", "--", "set", "Bridge", "h3o0", "datapath_type=netdev")
    inst.vsctl("add-port", "h3o0", "tap100i1", "tag=20")  # as Proxmox plugs a NIC with tag=20
    inst.wait_for_log("VLAN header stack length probed as 1")
    with Ovsdb(inst.remote, timeout=10) as conn:
        observed = conn.snapshot()
    assert observed.vlan_limit == 1
    with pytest.raises(OvsRefused) as caught:
        plan_tap_qinq(VmSpec(100, (), (TapQinQ(100, 1, QinQ(950)),)), observed)
    assert str(caught.value) == (
        "QinQ needs Open vSwitch other_config:vlan-limit 2 or 0, but it is 1 and ovs-vswitchd already runs "
        "the netdev datapath (bridges h3o0), which probed its VLAN depth with that limit; run "
        "`ovs-vsctl set Open_vSwitch . other_config:vlan-limit=2`, then restart ovs-vswitchd "
        "(systemctl restart openvswitch-switch), then start the VM again")
    assert inst.get("Port", "tap100i1", "tag", "vlan_mode") == {"tag": 20, "vlan_mode": []}


def test_snapshot_reads_a_probed_datapath_depth(fresh_ovs):
    inst = fresh_ovs("dpth", other_config={"vlan-limit": "2"})
    inst.vsctl("add-br", "h3d0", "--", "set", "Bridge", "h3d0", "datapath_type=netdev")
    # Datapath rows are made by operators (e.g. for conntrack zones); vswitchd fills capabilities.
    inst.vsctl("--", "--id=@dp", "create", "Datapath", "datapath_version=0",
               "--", "set", "Open_vSwitch", ".", "datapaths:netdev=@dp")
    with Ovsdb(inst.remote, timeout=10) as conn:
        deadline = time.monotonic() + 10
        while (observed := conn.snapshot()).probed_headers("netdev") is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert observed.probed_headers("netdev") == 2
