"""QinQ on Proxmox's taps of Linux bridges as tables: which devices, when a start is
refused, what post-start, the service and post-stop do (plan/lbqinq.py, no I/O)."""

import dataclasses

import pytest

from builders import PVE_ACCESS_950, after, linux_host, with_links
from pve_vhost_agent.errors import ConfigConflict, NetworkRefused, NotFound
from pve_vhost_agent.model.lbactions import AddSVlanBridge, DelSVlanBridge, RestoreLinuxTap, SetLinuxTapQinQ
from pve_vhost_agent.model.netdevs import (
    ETH_P_8021AD, ROLE_SBRIDGE, ROLE_SVLAN, ROLE_TAP, BridgeVlan, FilterRule, LinkInfo, LinkMark, LinkState,
    Placement, SVlanBridge, filter_rules,
)
from pve_vhost_agent.model.spec import EtherType, QinQ, TapQinQ, VmSpec
from pve_vhost_agent.plan.lbqinq import (
    check_before_start, linux_taps, plan_cleanup, plan_taps, svlan_in_place, tunnel, without_taps,
)

MAC = "virtio=BC:24:11:00:00:01"
AD, Q = EtherType.DOT1AD, EtherType.DOT1Q
NET = {"net0": f"{MAC},bridge=vmbr0,tag=950"}


def entry(ethertype=AD, cvlans=(), vmid=100, index=0, stag=950):
    return TapQinQ(vmid, index, QinQ(stag, cvlans, ethertype))


# --- which devices --------------------------------------------------------------------

TUNNELS = [
    ("traditional bridge, 802.1Q S-tag: Proxmox's vmbr0v950 already tunnels", dict(vlan_aware=False), Q,
     "vmbr0v950", None),
    ("traditional bridge, 802.1ad S-tag: an S-VLAN device on the uplink", dict(vlan_aware=False), AD,
     "vmbr0a950", SVlanBridge("vmbr0", 950, AD, "eth0", False, 1504)),
    ("802.1Q VLAN-aware bridge, 802.1ad S-tag: an S-VLAN device on the bond", dict(uplinks=("bond0",)), AD,
     "vmbr0a950", SVlanBridge("vmbr0", 950, AD, "bond0", False, 1504)),
    ("802.1Q VLAN-aware bridge, 802.1Q S-tag: through the bridge's own VLAN 950", {}, Q,
     "vmbr0q950", SVlanBridge("vmbr0", 950, Q, "vmbr0q950p", True, 1504)),
    ("802.1ad VLAN-aware bridge, 802.1ad S-tag: through the bridge's own VLAN 950", dict(protocol=ETH_P_8021AD), AD,
     "vmbr0a950", SVlanBridge("vmbr0", 950, AD, "vmbr0a950p", True, 1504)),
    ("802.1ad VLAN-aware bridge, 802.1Q S-tag: an S-VLAN device on the uplink", dict(protocol=ETH_P_8021AD), Q,
     "vmbr0q950", SVlanBridge("vmbr0", 950, Q, "eth0", False, 1504)),
]


@pytest.mark.parametrize("what, host, ethertype, master, svlan", TUNNELS, ids=[t[0] for t in TUNNELS])
def test_the_s_tag_and_the_bridge_decide_the_devices(what, host, ethertype, master, svlan):
    found = tunnel(100, entry(ethertype), NET["net0"], linux_host(**host))
    assert (found.master, found.svlan) == (master, svlan)


def test_only_taps_on_linux_bridges_are_linux_work_the_rest_stays_with_open_vswitch():
    vm = VmSpec(100, (), (entry(), entry(index=1)))
    config = {**NET, "net1": f"{MAC},bridge=ovsbr0,tag=950"}
    ovs_bridge = LinkInfo("ovsbr0", 30, "openvswitch")
    assert linux_taps(vm, config, linux_host(ovs_bridge)) == (entry(),)
    assert without_taps(vm, (entry(),)).tap_qinq == (entry(index=1),)
    assert linux_taps(vm, config, None) == ()  # links unread: the Open vSwitch path, as before


def test_device_names_are_the_bridges_with_tpid_s_tag_and_role():
    svlan = SVlanBridge("vmbr0", 950, Q, "vmbr0q950p", True)
    assert [svlan.name(role) for role in svlan.roles] == ["vmbr0q950", "vmbr0q950u", "vmbr0q950t", "vmbr0q950p"]
    assert SVlanBridge("vmbr0", 950, AD, "eth0").roles == (ROLE_SBRIDGE, ROLE_SVLAN)


# --- pre-start -------------------------------------------------------------------------

FOREIGN = LinkInfo("vmbr0a950", 50, "bridge")
FOREIGN_SLOT = LinkInfo("eth0.s950", 51, "vlan", lower=2, vlan_id=950, vlan_protocol=ETH_P_8021AD)
REFUSALS = [
    ("no uplink", linux_host(uplinks=()), NET, entry(), NetworkRefused, "bridge vmbr0 has no uplink"),
    ("two uplinks for an S-VLAN device", linux_host(uplinks=("eth0", "eth1")), NET, entry(), NetworkRefused,
     "several uplinks (eth0, eth1)"),
    ("uplink MTU = the tap's", linux_host(uplink_mtu=1500), NET, entry(), NetworkRefused,
     "uplink eth0 of vmbr0 has MTU 1500, but QinQ frames from tap100i0 (MTU 1500, its bridge's) need 1504"),
    ("uplink MTU = the tap's, through the bridge's VLAN", linux_host(uplink_mtu=1500), NET, entry(Q), NetworkRefused,
     "need 1504"),
    ("a name that is someone else's", linux_host(FOREIGN), NET, entry(), NetworkRefused,
     "vmbr0a950, the name of the agent's sbridge device for S-VLAN 950 of vmbr0, is taken"),
    ("the uplink's 802.1ad VLAN 950 is taken", linux_host(FOREIGN_SLOT), NET, entry(), NetworkRefused,
     "eth0 already has VLAN device eth0.s950 for 802.1ad VLAN 950"),
    ("a bridge the host does not have", linux_host(), {"net0": f"{MAC},bridge=vmbr7,tag=950"},
     entry(), NotFound, "no Linux bridge vmbr7"),
    ("C-VLANs and Proxmox's rate limit", linux_host(), {"net0": f"{MAC},bridge=vmbr0,tag=950,rate=10"},
     entry(cvlans=(10,)), ConfigConflict, "rate limit"),
    ("the NIC lost its S-tag", linux_host(), {"net0": f"{MAC},bridge=vmbr0,tag=20"}, entry(), ConfigConflict,
     "tag=950"),
]


@pytest.mark.parametrize("what, host, config, wanted, error, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_pre_start_refuses_what_cannot_hold(what, host, config, wanted, error, words):
    with pytest.raises(error) as caught:
        check_before_start(100, (wanted,), config, host)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == error.exit_code


def test_a_bridge_name_that_leaves_no_room_for_the_agents_names_is_refused():
    long = LinkInfo("vmbr0longer", 10, "bridge", vlan_filtering=True)
    host = LinkState((long, LinkInfo("eth0", 2, "", 1504, master=10)))
    with pytest.raises(NetworkRefused) as caught:
        check_before_start(100, (entry(),), {"net0": f"{MAC},bridge=vmbr0longer,tag=950"}, host)
    assert "vmbr0longera950u" in str(caught.value) and "at most 10 characters" in str(caught.value)


@pytest.mark.parametrize("host, wanted", [
    (linux_host(), entry()), (linux_host(), entry(Q, (10, 20))), (linux_host(vlan_aware=False), entry(Q)),
    (linux_host(uplinks=("bond0",), uplink_mtu=9000), entry()),
    (linux_host(uplinks=("eth0", "eth1")), entry(Q)),  # through the bridge: every uplink carries VLAN 950
])
def test_pre_start_lets_what_holds_start(host, wanted):
    check_before_start(100, (wanted,), NET, host)


def test_the_agents_own_devices_from_an_earlier_run_are_no_collision():
    host = linux_host()
    check_before_start(100, (entry(),), NET, after(host, plan_taps(100, (entry(),), NET, host)))


# --- post-start and the service ---------------------------------------------------------

def test_post_start_makes_the_devices_then_the_tap_and_a_second_run_plans_nothing():
    host = linux_host()
    actions = plan_taps(100, (entry(cvlans=(10, 20)),), NET, host)
    svlan = SVlanBridge("vmbr0", 950, AD, "eth0", False, 1504)
    assert actions == (AddSVlanBridge(svlan), SetLinuxTapQinQ(
        "tap100i0", 100, "net0", "vmbr0", QinQ(950, (10, 20), AD), "vmbr0a950", Placement("vmbr0", PVE_ACCESS_950)))
    done = after(host, actions)
    assert svlan_in_place(svlan, done)
    assert plan_taps(100, (entry(cvlans=(10, 20)),), NET, done) == ()
    assert actions[1].sentence() == ("make Proxmox's tap100i0 a QinQ port: S-tag 950 (802.1ad), C-VLANs 10,20, in "
                                     "vmbr0a950 (Proxmox plugged it into vmbr0, VLAN 950 untagged (PVID))")


def test_through_the_bridges_own_vlan_the_veth_must_be_a_tagged_member_of_that_vlan_only():
    host = linux_host()
    done = after(host, plan_taps(100, (entry(Q),), NET, host))
    assert plan_taps(100, (entry(Q),), NET, done) == ()
    trunk = done.get("vmbr0q950t")
    pvid_too = with_links(done, dataclasses.replace(trunk, vlans=(BridgeVlan(1, True, True), BridgeVlan(950))))
    assert [type(a) for a in plan_taps(100, (entry(Q),), NET, pvid_too)] == [AddSVlanBridge]


def test_a_tap_proxmox_plugged_again_with_another_tag_is_taken_back_saving_proxmoxs_new_placement():
    host = linux_host()
    done = after(host, plan_taps(100, (entry(),), NET, host))
    tag_20 = (BridgeVlan(20, True, True),)
    replugged = with_links(done, dataclasses.replace(done.get("tap100i0"), master=10, vlans=tag_20))
    assert plan_taps(100, (entry(),), NET, replugged) == (SetLinuxTapQinQ(
        "tap100i0", 100, "net0", "vmbr0", QinQ(950), "vmbr0a950", Placement("vmbr0", tag_20)),)
    # Between Proxmox's unplug and its plug, the saved placement stays what the mark says.
    unplugged = with_links(done, dataclasses.replace(done.get("tap100i0"), master=None, vlans=()))
    assert plan_taps(100, (entry(),), NET, unplugged)[0].saved == Placement("vmbr0", PVE_ACCESS_950)


def test_lost_filters_and_changed_c_vlans_are_put_right():
    host = linux_host(vlan_aware=False)
    done = after(host, plan_taps(100, (entry(Q, (10,)),), NET, host))
    assert done.get("tap100i0").master == 11  # it stays in Proxmox's vmbr0v950
    no_filters = with_links(done, dataclasses.replace(done.get("tap100i0"), filters=()))
    assert [type(a) for a in plan_taps(100, (entry(Q, (10,)),), NET, no_filters)] == [SetLinuxTapQinQ]
    assert plan_taps(100, (entry(Q, (10, 11)),), NET, done)[0].qinq.cvlans == (10, 11)


def test_a_tap_no_longer_declared_gets_proxmoxs_placement_back():
    host = linux_host()
    done = after(host, plan_taps(100, (entry(),), NET, host))
    assert plan_taps(100, (), NET, done) == (RestoreLinuxTap(
        "tap100i0", Placement("vmbr0", PVE_ACCESS_950), 100, "its QinQ is no longer declared"),)


FIREWALL = linux_host(LinkInfo("fwbr100i0", 30, "bridge"), LinkInfo("tap100i0", 31, "tun", master=30), taps=())


@pytest.mark.parametrize("what, host, words", [
    ("no tap", linux_host(taps=()), "the host has no tap100i0"),
    ("behind the firewall bridge", FIREWALL, "sits behind Proxmox's firewall bridge fwbr100i0"),
])
def test_a_running_vm_whose_tap_cannot_be_made_qinq_is_a_problem(what, host, words):
    with pytest.raises((NotFound, ConfigConflict)) as caught:
        plan_taps(100, (entry(),), NET, host)
    assert words in str(caught.value)


def test_two_vms_share_one_s_vlan_bridge():
    host = linux_host(taps=("tap100i0", "tap101i0"))
    both = plan_taps(100, (entry(),), NET, host)
    done = after(host, both)
    second = plan_taps(101, (entry(vmid=101),), NET, done)
    assert [type(a) for a in both] == [AddSVlanBridge, SetLinuxTapQinQ] and [type(a) for a in second] == [SetLinuxTapQinQ]


# --- post-stop and leftovers ----------------------------------------------------------------

def test_post_stop_removes_the_s_vlan_devices_once_no_qinq_tap_uses_them():
    host = linux_host(taps=("tap100i0", "tap101i0"))
    done = after(host, plan_taps(100, (entry(),), NET, host))
    done = after(done, plan_taps(101, (entry(vmid=101),), NET, done))
    key = ("vmbr0", 950, AD)
    gone_100 = LinkState(tuple(link for link in done.links if link.name != "tap100i0"))  # QEMU's exit took it
    assert plan_cleanup(gone_100, lambda vmid: vmid == 100, only=[key]) == ()  # VM 101's tap still uses them
    nobody = LinkState(tuple(link for link in gone_100.links if link.name != "tap101i0"))
    assert plan_cleanup(nobody, lambda vmid: vmid == 101, only=[key]) == (
        DelSVlanBridge("vmbr0", 950, "802.1ad", ("vmbr0a950u", "vmbr0a950")),)
    assert plan_cleanup(nobody, lambda vmid: False, needed=[key]) == ()  # a running VM will use them again
    assert plan_cleanup(nobody, lambda vmid: False, only=[("vmbr1", 950, AD)]) == ()  # another VM's business


def test_the_veth_goes_too_and_a_tap_left_behind_is_given_back():
    host = linux_host()
    done = after(host, plan_taps(100, (entry(Q),), NET, host))
    actions = plan_cleanup(done, lambda vmid: vmid == 100, reason="VM 100 migrated to node pve2")
    assert actions == (RestoreLinuxTap("tap100i0", Placement("vmbr0", PVE_ACCESS_950), 100, "VM 100 migrated to node pve2"),
                       DelSVlanBridge("vmbr0", 950, "802.1q", ("vmbr0q950u", "vmbr0q950t", "vmbr0q950p", "vmbr0q950"),
                                      "VM 100 migrated to node pve2"))


# --- marks and filters ---------------------------------------------------------------------

def test_a_mark_says_whose_and_where_proxmox_had_plugged_the_tap_and_parses_back():
    mark = LinkMark(ROLE_TAP, "vmbr0", 950, AD, 100, "net0", (10, 20, 21), "vmbr0a950",
                    Placement("vmbr0", (BridgeVlan(950, True, True), BridgeVlan(2), BridgeVlan(3))))
    assert mark.alias() == ("pve-vhost-agent role=tap vmid=100 nic=net0 bridge=vmbr0 stag=950 ethertype=802.1ad "
                            "cvlans=10,20-21 via=vmbr0a950 was=vmbr0 was-vlans=2-3,950pu")
    assert LinkMark.parse(mark.alias()) == mark
    device = LinkMark(ROLE_SVLAN, "vmbr0", 950, Q)
    assert LinkMark.parse(device.alias()) == device


@pytest.mark.parametrize("alias", [
    "", "pve-vhost-agent", "someone else's alias", "pve-vhost-agent role=tap bridge=vmbr0 stag=950 ethertype=802.1ad",
    "pve-vhost-agent role=sbridge bridge=vmbr0 stag=5000 ethertype=802.1ad",
    "pve-vhost-agent role=sbridge bridge=vmbr0 stag=950 ethertype=802.1ad extra=1",
    "pve-vhost-agent role=sbridge  bridge=vmbr0 stag=950 ethertype=802.1ad",
    "pve-vhost-agent role=tap vmid=100 nic=net0 bridge=vmbr0 stag=950 ethertype=802.1ad was=vmbr0 was-vlans=950x",
])
def test_an_alias_the_agent_did_not_write_is_no_mark(alias):
    assert LinkMark.parse(alias) is None
    assert LinkInfo("x", 1, alias=alias).mark is None


def test_c_vlan_filters_pass_the_listed_ranges_both_ways_and_drop_the_rest():
    rules = filter_rules((10, 20, 21, 22))
    assert rules[:3] == (FilterRule("ingress", 0xC000, 10, 10), FilterRule("ingress", 0xC001, 20, 22),
                         FilterRule("ingress", 0xCFFF, drop=True))
    assert [r.direction for r in rules[3:]] == ["egress"] * 3 and filter_rules(()) == ()
