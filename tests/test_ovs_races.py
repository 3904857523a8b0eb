"""OVSDB edge cases found in review, against a real ovsdb-server and ovs-vswitchd:
a vlan-limit raised at runtime, two starts adding one bridge at once, and a tap's restore."""

import threading
import time

import pytest

from fixtures.ovs import _alive, run

from pve_vhost_agent.errors import OvsRefused, OwnershipError
from pve_vhost_agent.model.actions import EnsureBridge, RestoreTapVlan, SetTapQinQ
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ovs import plan_tap_qinq
from pve_vhost_agent.adapters.ovsrows import write
from pve_vhost_agent.model.ovs import PortVlan
from pve_vhost_agent.model.spec import QinQ, TapQinQ, VmSpec

OWNER = "pve-vhost-agent:owner"
TAP_QINQ = VmSpec(100, (), (TapQinQ(100, 1, QinQ(950)),))
TUNNEL = PortVlan("dot1q-tunnel", 950, (), (), "802.1ad")


def _tapped_bridge(inst, bridge="h11ofq0"):
    inst.vsctl("add-br", bridge, "--", "set", "Bridge", bridge, "datapath_type=netdev")
    inst.vsctl("add-port", bridge, "tap100i1", "tag=20")  # as Proxmox plugs a NIC with tag=20


def _datapath_row(inst, dp="netdev"):
    uuid = inst.get("Open_vSwitch", ".", "datapaths")["datapaths"][dp]
    return inst.get("Datapath", uuid, "capabilities", "external_ids")


def test_vlan_limit_raised_at_runtime_is_caught_through_the_agents_datapath_row(fresh_ovs):
    inst = fresh_ovs("h11ofrt")  # vlan-limit unset: the datapath probes one header
    _tapped_bridge(inst)
    inst.wait_for_log("VLAN header stack length probed as 1")
    inst.vsctl("set", "Open_vSwitch", ".", "other_config:vlan-limit=2")  # the README step, no restart
    with Ovsdb(inst.remote, timeout=10) as db:
        observed = db.snapshot()
        assert observed.vlan_limit == 2 and observed.probed_headers("netdev") is None  # OVS has no Datapath row
        with pytest.raises(OvsRefused) as caught:
            db.apply(plan_tap_qinq(TAP_QINQ, observed))
        message = str(caught.value)
        assert "netdev datapath was probed with 1" in message and "restart openvswitch-switch" in message
        assert "\n" not in message
        # Known from now on: the next plan refuses at once, naming the same fix.
        with pytest.raises(OvsRefused, match="probed with 1.*restart openvswitch-switch"):
            plan_tap_qinq(TAP_QINQ, db.snapshot())
    assert inst.get("Port", "tap100i1", "tag", "vlan_mode") == {"tag": 20, "vlan_mode": []}
    assert _datapath_row(inst) == {"capabilities": _datapath_row(inst)["capabilities"],
                                   "external_ids": {OWNER: "datapath"}}
    assert _datapath_row(inst)["capabilities"]["max_vlan_headers"] == "1"

    # The fix the message names: ovs-vswitchd restarted probes anew and refreshes the row.
    _restart_vswitchd(inst)
    with Ovsdb(inst.remote, timeout=10) as db:
        db.apply(plan_tap_qinq(TAP_QINQ, db.snapshot()))
        assert plan_tap_qinq(TAP_QINQ, db.snapshot()) == ()
    assert _datapath_row(inst)["capabilities"]["max_vlan_headers"] == "2"
    assert inst.get("Port", "tap100i1", "tag", "vlan_mode") == {"tag": 950, "vlan_mode": "dot1q-tunnel"}


def _restart_vswitchd(inst):
    """`systemctl restart openvswitch-switch` for a private instance: same binary, same namespace."""
    inst.appctl("exit")
    old = inst.pids["ovs-vswitchd"]
    deadline = time.monotonic() + 10
    while _alive(old) and time.monotonic() < deadline:
        time.sleep(0.02)
    run("ip", "netns", "exec", inst.netns, "ovs-vswitchd", inst.remote, "-vconsole:off", "--pidfile", "--detach",
        "--log-file", env=inst.env, timeout=60)
    inst.pids["ovs-vswitchd"] = int((inst.run_dir / "ovs-vswitchd.pid").read_text())
    inst.vsctl("set", "Open_vSwitch", ".", "external_ids:h11of-restarted=1")  # returns once vswitchd applied it


def test_vlan_limit_set_before_the_datapath_is_proven_and_then_planned_no_more(fresh_ovs):
    inst = fresh_ovs("h11ofok", other_config={"vlan-limit": "2"})
    _tapped_bridge(inst)
    with Ovsdb(inst.remote, timeout=10) as db:
        plan = plan_tap_qinq(TAP_QINQ, db.snapshot())
        assert [type(a).__name__ for a in plan] == ["EnsureDatapath", "CheckVlanHeaders", "SetTapQinQ"]
        db.apply(plan)
        assert plan_tap_qinq(TAP_QINQ, db.snapshot()) == ()
    assert _datapath_row(inst)["capabilities"]["max_vlan_headers"] == "2"
    assert inst.get("Port", "tap100i1", "tag", "vlan_mode")["vlan_mode"] == "dot1q-tunnel"


def test_an_empty_datapath_row_of_the_agent_is_made_anew_and_a_foreign_one_left_alone(fresh_ovs):
    inst = fresh_ovs("h11ofdp", other_config={"vlan-limit": "2"})
    # A row made before the datapath ran stays empty: ovs-vswitchd fills a row only when it appears.
    inst.vsctl("--", "--id=@dp", "create", "Datapath", "datapath_version=0", f'external_ids:"{OWNER}"=datapath',
               "--", "set", "Open_vSwitch", ".", "datapaths:netdev=@dp")
    _tapped_bridge(inst)
    assert _datapath_row(inst)["capabilities"] == {}
    with Ovsdb(inst.remote, timeout=10) as db:
        db.apply(plan_tap_qinq(TAP_QINQ, db.snapshot()))
    assert _datapath_row(inst)["capabilities"]["max_vlan_headers"] == "2"

    other = fresh_ovs("h11offo", other_config={"vlan-limit": "2"})
    other.vsctl("--", "--id=@dp", "create", "Datapath", "datapath_version=0", "external_ids:who=operator",
                "--", "set", "Open_vSwitch", ".", "datapaths:netdev=@dp")
    _tapped_bridge(other)
    before = other.get("Open_vSwitch", ".", "datapaths")
    with Ovsdb(other.remote, timeout=10) as db:
        plan = plan_tap_qinq(TAP_QINQ, db.snapshot())
        assert [type(a).__name__ for a in plan] == ["SetTapQinQ"]  # cannot tell, and not the agent's row
    assert other.get("Open_vSwitch", ".", "datapaths") == before


def test_two_starts_adding_the_same_bridge_at_once_both_succeed(ovs):
    """Both transactions are built on the same view of OVSDB before either commits."""
    both_built = threading.Barrier(2, timeout=10)
    errors, changed = [], []

    def start():
        try:
            with Ovsdb(ovs.remote, timeout=10) as db:
                db.snapshot()
                first = []

                def build(view):
                    write(view, EnsureBridge("h11ofr0", "netdev"))
                    if not first:  # a retry must not wait for the other thread
                        first.append(1)
                        both_built.wait()

                changed.append(db.transact(build, "EnsureBridge h11ofr0"))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []
        assert sorted(changed) == [False, True]  # the retry found the bridge: nothing to do
        assert ovs.find("Bridge", "name=h11ofr0") == ["h11ofr0"]
    finally:
        ovs.vsctl("--if-exists", "del-br", "h11ofr0")


def test_restore_writes_the_vlan_the_plan_showed_or_nothing(ovs):
    _tapped_bridge(ovs, "h11ofs0")
    try:
        with Ovsdb(ovs.remote, timeout=10) as db:
            db.apply([SetTapQinQ("tap100i1", 100, "net1", TUNNEL, PortVlan("", 20))])
            shown = RestoreTapVlan("tap100i1", PortVlan("", 30))  # not what the port saved
            with pytest.raises(OwnershipError, match=r"\(default tag=20\) other than the planned \(default tag=30\)"):
                db.apply([shown])
            assert ovs.get("Port", "tap100i1", "tag")["tag"] == 950
            db.apply([RestoreTapVlan("tap100i1", PortVlan("", 20))])
        row = ovs.get("Port", "tap100i1", "tag", "vlan_mode", "external_ids")
        assert row == {"tag": 20, "vlan_mode": [], "external_ids": {}}
    finally:
        ovs.vsctl("--if-exists", "del-br", "h11ofs0")
