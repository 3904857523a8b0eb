"""QinQ on Proxmox's tap NICs as tables: when a start must be refused, when uplinks lose frames."""

import pytest

from pve_vhost_agent.errors import ConfigConflict, NotFound, OvsRefused
from pve_vhost_agent.model.host import Link
from pve_vhost_agent.model.ovs import FrozenMap, OvsBridge, OvsInterface, OvsPort, OvsState, PortVlan
from pve_vhost_agent.model.spec import QinQ, TapQinQ, VmSpec
from pve_vhost_agent.plan.tapqinq import check_before_start, check_nic, fixed_net_value, link_warnings

MAC = "virtio=BC:24:11:00:00:01"
VM = VmSpec(100, (), (TapQinQ(100, 0, QinQ(950)),))
GOOD = {"net0": f"{MAC},bridge=vmbr0,tag=950"}


def ovs(*bridges, vlan_limit="2", probed=(), ports=()):
    return OvsState(bridges=tuple(OvsBridge(name, dp) for name, dp in bridges) or (OvsBridge("vmbr0", "netdev"),),
                    ports=tuple(ports),
                    other_config=FrozenMap({"vlan-limit": vlan_limit} if vlan_limit else {}),
                    probed_vlan_headers=FrozenMap(dict(probed)))


@pytest.mark.parametrize("value, stag, fixed", [
    (f"{MAC},bridge=vmbr0", 950, f"{MAC},bridge=vmbr0,tag=950"),
    (f"{MAC},bridge=vmbr0,firewall=1,tag=10,trunks=10;20", 950, f"{MAC},bridge=vmbr0,tag=950"),
    ("model=virtio,macaddr=BC:24:11:00:00:01,bridge=vmbr0,mtu=1400,queues=4", 5,
     "model=virtio,macaddr=BC:24:11:00:00:01,bridge=vmbr0,mtu=1400,queues=4,tag=5"),
])
def test_the_fix_keeps_the_nic_and_sets_only_the_s_tag(value, stag, fixed):
    assert fixed_net_value(value, stag) == fixed
    check_nic(100, 0, fixed, stag)  # the fix is accepted


NIC_TABLE = [
    ("untagged: a trunk of every VLAN until post-start", f"{MAC},bridge=vmbr0",
     f"untagged it would carry every VLAN; run `qm set 100 --net0 {MAC},bridge=vmbr0,tag=950`"),
    ("another tag", f"{MAC},bridge=vmbr0,tag=20", "`qm set 100 --net0 " + MAC + ",bridge=vmbr0,tag=950`"),
    ("the tag plus trunks (native-untagged)", f"{MAC},bridge=vmbr0,tag=950,trunks=10;20",
     "`qm set 100 --net0 " + MAC + ",bridge=vmbr0,tag=950`"),
    ("firewall on", f"{MAC},bridge=vmbr0,firewall=1,tag=950",
     "firewall=1, so its OVS port is Proxmox's firewall veth, not tap100i0; turn the firewall off on net0 for QinQ: "
     f"`qm set 100 --net0 {MAC},bridge=vmbr0,tag=950`"),
    ("no bridge", f"{MAC},tag=950", f"has no bridge; attach it to an OVS bridge: `qm set 100 --net0 {MAC},tag=950,bridge="),
]


@pytest.mark.parametrize("what, value, words", NIC_TABLE, ids=[r[0] for r in NIC_TABLE])
def test_a_nic_that_would_not_fail_closed_is_refused_with_the_qm_set_fix(what, value, words):
    with pytest.raises(ConfigConflict) as caught:
        check_nic(100, 0, value, 950)
    assert words in str(caught.value) and "\n" not in str(caught.value)


START_TABLE = [
    ("NIC removed from the config", {}, ovs(), NotFound, "has no net0 in its config"),
    ("tag changed after `qinq set`", {"net0": f"{MAC},bridge=vmbr0,tag=20"}, ovs(), ConfigConflict, "tag=950"),
    ("firewall turned on after `qinq set`", {"net0": f"{MAC},bridge=vmbr0,tag=950,firewall=1"}, ovs(),
     ConfigConflict, "firewall=1"),
    ("a bridge OVS does not have (a Linux bridge)", GOOD, ovs(("vmbr9", "")), NotFound,
     "Open vSwitch has no bridge vmbr0, so tap100i0 cannot become a QinQ port"),
    ("vlan-limit 1 while vmbr0's datapath runs", GOOD, ovs(("vmbr0", ""), vlan_limit=""), OvsRefused,
     "vlan-limit 2 or 0, but it is 1"),
    ("vlan-limit raised after the datapath probed one header", GOOD, ovs(("vmbr0", ""), probed={"system": "1"}),
     OvsRefused, "probed with 1"),
]


@pytest.mark.parametrize("what, config, observed, error, words", START_TABLE, ids=[r[0] for r in START_TABLE])
def test_pre_start_refuses_a_qinq_that_cannot_hold(what, config, observed, error, words):
    with pytest.raises(error) as caught:
        check_before_start(VM, config, observed)
    assert words in str(caught.value)


@pytest.mark.parametrize("what, observed", [
    ("vlan-limit 2", ovs()),
    ("vlan-limit 0", ovs(vlan_limit="0")),
    ("vlan-limit 1, but every datapath probed two headers: post-start raises it", ovs(vlan_limit="", probed={"netdev": "2"})),
    ("a stale tap port of another run, owned by the agent", ovs(ports=[OvsPort("tap100i0", "vmbr0", PortVlan(
        "dot1q-tunnel", 950), FrozenMap({"pve-vhost-agent:owner": "vlan", "pve-vhost-agent:vmid": "100"}))])),
])
def test_pre_start_lets_a_qinq_that_holds_start(what, observed):
    check_before_start(VM, GOOD, observed)


def test_a_vm_without_tap_qinq_is_never_refused():
    check_before_start(VmSpec(100), {}, OvsState())


# --- post-start: links -------------------------------------------------------------------------


def link(name, index, mtu=1500, kind="", up=True, master=None):
    return Link(name, index, mtu, kind, up, master)


def port(name, bridge="vmbr0", *ifaces, iface_type=""):
    return OvsPort(name, bridge, interfaces=tuple(OvsInterface(i, iface_type) for i in (ifaces or (name,))))


TAP = port("tap100i0")
TAP_LINK = link("tap100i0", 50, 1500, "tun")


def warnings(ports, links):
    found = link_warnings(VM, OvsState(ports=(TAP, *ports)), {lk.name: lk for lk in (TAP_LINK, *links)})
    return [(w.link, w.text) for w in found]


def test_uplinks_that_take_the_s_tag_give_no_warning():
    assert warnings([port("eno1")], [link("eno1", 2, 1504)]) == []
    assert warnings([port("eno1")], [link("eno1", 2, 9000)]) == []


def test_a_physical_uplink_without_room_for_the_s_tag_is_named_with_the_fix():
    assert warnings([port("eno1")], [link("eno1", 2, 1500)]) == [(
        "eno1", "VM 100 net0: uplink eno1 of bridge vmbr0 has MTU 1500, but QinQ frames from tap100i0 (MTU 1500) "
                "need 1504 with the S-tag: full-size frames are dropped; set `mtu 1504` on eno1 in "
                "/etc/network/interfaces, then `ifreload -a`")]


def test_a_linux_bond_and_its_slaves_are_checked_and_the_fix_goes_on_the_bond():
    links = [link("bond0", 10, 1504, "bond"), link("eno1", 2, 1504, master=10), link("eno2", 3, 1500, master=10),
             link("eno3", 4, 1500)]  # eno3 is in no bond and on no bridge: not an uplink
    found = warnings([port("bond0")], links)
    assert [w[0] for w in found] == ["eno2"]
    assert "uplink eno2 of bridge vmbr0 has MTU 1500" in found[0][1] and "set `mtu 1504` on bond0 in" in found[0][1]
    links[0] = link("bond0", 10, 1500, "bond")
    assert [w[0] for w in warnings([port("bond0")], links)] == ["bond0", "eno2"]


def test_an_ovs_bond_port_checks_each_of_its_interfaces():
    found = warnings([port("bond0", "vmbr0", "eno1", "eno2")], [link("eno1", 2, 1504), link("eno2", 3, 1500)])
    assert [w[0] for w in found] == ["eno2"] and "set `mtu 1504` on eno2" in found[0][1]


def test_guest_ports_internal_ports_and_other_bridges_are_not_uplinks():
    ports = [port("tap200i0"), port("veth300i1"), port("fwln400o0"), port("vmbr0", iface_type="internal"),
             port("vhu100i1", iface_type="dpdkvhostuserclient"), port("eno9", "vmbr1"), port("eno8")]
    links = [link("tap200i0", 20, 1400, "tun"), link("veth300i1", 21, 1400, "veth"), link("fwln400o0", 22, 1400, "openvswitch"),
             link("vmbr0", 23, 1400, "openvswitch"), link("vhu100i1", 24, 1400), link("eno9", 25, 1400)]
    # eno8 has no kernel link here (e.g. a DPDK NIC): nothing to read, nothing to say.
    assert warnings(ports, links) == []


def test_a_jumbo_tap_needs_a_jumbo_uplink_plus_four():
    found = link_warnings(VM, OvsState(ports=(TAP, port("eno1"))),
                          {"tap100i0": link("tap100i0", 50, 9000, "tun"), "eno1": link("eno1", 2, 9000)})
    assert [w.link for w in found] == ["eno1"] and "need 9004" in found[0].text and "`mtu 9004`" in found[0].text


def test_a_missing_or_down_tap_is_reported():
    down = link_warnings(VM, OvsState(ports=(TAP,)), {"tap100i0": link("tap100i0", 50, 1500, "tun", up=False)})
    assert [w.text for w in down] == ["VM 100 net0: tap100i0 is down; pve-bridge brings it up when QEMU starts: "
                                      "see the start's task log"]
    missing = link_warnings(VM, OvsState(), {})
    assert [w.link for w in missing] == ["tap100i0"] and "missing" in missing[0].text
