"""Bridges, VLAN devices, bonds and MTUs on Debian 12's own kernel, set up and read through
netlink (pyroute2), with frames where a user would look at the wire.

The test machine's kernel has no bridge VLAN filtering, 8021q or bonding, so this whole file
runs inside a QEMU guest booting Debian's kernel (tests/fixtures/kernelvm.py); each test
below is reported on the host with the guest's outcome. The guest is fresh for the file;
each test removes the links it made (all named kv*).
"""

import errno
import os
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

import pve_vhost_agent

from fixtures.frames import capture_socket, collect, frame, mac, tag_text
from fixtures.kernelvm import in_guest
from pve_vhost_agent.adapters.host import read_links
from pve_vhost_agent.model.ovs import OvsInterface, OvsPort, OvsState
from pve_vhost_agent.model.spec import QinQ, TapQinQ, VmSpec
from pve_vhost_agent.plan.tapqinq import link_warnings

pytestmark = pytest.mark.real_kernel

CHECKOUT = Path(__file__).resolve().parents[1]
PREFIX = "kv"
ETH_P_8021AD = 0x88A8
ETH_P_8021Q = 0x8100
BOND_MODES = {"active-backup": 1, "802.3ad": 4}
VLAN_FLAGS = {"pvid": 0x2, "untagged": 0x4}


@pytest.fixture
def ipr():
    """pyroute2's IPRoute in the guest; every kv* link is deleted afterwards (veth peers too)."""
    with IPRoute() as ipr:
        yield ipr
        for msg in ipr.get_links():
            if msg.get_attr("IFLA_IFNAME").startswith(PREFIX) and ipr.link_lookup(index=msg["index"]):
                ipr.link("del", index=msg["index"])


def add(ipr: IPRoute, name: str, kind: str, **attrs) -> int:
    ipr.link("add", ifname=name, kind=kind, **attrs)
    return index(ipr, name)


def index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    assert found, f"no link {name}"
    return found[0]


def veth(ipr: IPRoute, name: str, peer: str) -> tuple[int, int]:
    ipr.link("add", ifname=name, kind="veth", peer=peer)
    return index(ipr, name), index(ipr, peer)


def up(ipr: IPRoute, *indexes: int) -> None:
    for i in indexes:
        ipr.link("set", index=i, state="up")


def link(ipr: IPRoute, i: int):
    return ipr.get_links(i)[0]


def info_data(ipr: IPRoute, i: int) -> dict:
    """IFLA_INFO_DATA of a link as {attribute name: value}."""
    data = link(ipr, i).get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    return {name: value for name, value in data["attrs"]}


def port_vlans(ipr: IPRoute, bridge: int) -> dict[str, dict[int, set[str]]]:
    """{port: {vid: {"pvid", "untagged"}}} of the bridge and its ports, as `bridge vlan show`."""
    table = {}
    for msg in ipr.get_vlans():
        if msg.get_attr("IFLA_MASTER") != bridge:
            continue
        entries = msg.get_attr("IFLA_AF_SPEC").get_attrs("IFLA_BRIDGE_VLAN_INFO")
        table[msg.get_attr("IFLA_IFNAME")] = {
            entry["vid"]: {flag for flag, bit in VLAN_FLAGS.items() if entry["flags"] & bit} for entry in entries}
    return table


def vlan_aware_bridge(ipr: IPRoute, **bridge_attrs) -> dict[str, int]:
    """Bridge kvbr with two veth ports: kva0 (access VLAN 10: pvid, untagged) and kvb0
    (trunk of 10 and 20, still in VLAN 1 untagged by default). kva1/kvb1 are the far ends."""
    links = {"kvbr": add(ipr, "kvbr", "bridge", br_vlan_filtering=1, **bridge_attrs)}
    for side in "ab":
        links[f"kv{side}0"], links[f"kv{side}1"] = veth(ipr, f"kv{side}0", f"kv{side}1")
        ipr.link("set", index=links[f"kv{side}0"], master=links["kvbr"])
    ipr.vlan_filter("del", index=links["kva0"], vlan_info={"vid": 1})
    ipr.vlan_filter("add", index=links["kva0"], vlan_info={"vid": 10, "flags": ["pvid", "untagged"]})
    for vid in (10, 20):
        ipr.vlan_filter("add", index=links["kvb0"], vlan_info={"vid": vid})
    up(ipr, *links.values())
    wait_forwarding(ipr, links["kva0"], links["kvb0"])
    return links


def wait_forwarding(ipr: IPRoute, *ports: int, timeout: float = 10.0) -> None:
    """Until the bridge ports forward (STP is off: at once, once the links are up)."""
    deadline = time.monotonic() + timeout
    while True:
        states = [link(ipr, p).get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_SLAVE_DATA").get_attr("IFLA_BRPORT_STATE")
                  for p in ports]
        if all(state == 3 for state in states):  # BR_STATE_FORWARDING
            return
        assert time.monotonic() < deadline, f"bridge ports not forwarding: {states}"
        time.sleep(0.05)


def test_the_harness_runs_this_file_in_a_guest_on_debians_kernel_with_the_checkouts_code():
    assert in_guest()
    assert os.uname().release.endswith("-amd64"), os.uname()  # Debian's kernel, not the host's
    assert Path(pve_vhost_agent.__file__).resolve().is_relative_to(CHECKOUT)
    with pytest.raises(OSError) as refused:
        (CHECKOUT / "kv-written-in-the-guest").write_text("")
    assert refused.value.errno == errno.EROFS  # the guest sees the checkout read-only


def test_a_vlan_aware_bridge_keeps_per_port_vlans_and_an_untagged_pvid(ipr):
    links = vlan_aware_bridge(ipr)
    assert info_data(ipr, links["kvbr"])["IFLA_BR_VLAN_FILTERING"] == 1
    assert port_vlans(ipr, links["kvbr"]) == {"kvbr": {1: {"pvid", "untagged"}},  # the bridge's own entry
                                              "kva0": {10: {"pvid", "untagged"}},
                                              "kvb0": {1: {"pvid", "untagged"}, 10: set(), 20: set()}}
    a, b = capture_socket("kva1"), capture_socket("kvb1")
    with a, b:
        # An untagged frame entering the access port joins VLAN 10 and leaves the trunk tagged.
        a.send(frame(mac(1)))
        assert [tag_text(f) for f in collect(b, mac(1))] == ["8100/10"]
        # From the trunk: VLAN 20 (and untagged VLAN 1) never reach the access port; VLAN 10
        # does, untagged. Frames arrive in order, so the last one proves the others were dropped.
        b.send(frame(mac(2), (ETH_P_8021Q, 20)))
        b.send(frame(mac(3)))
        b.send(frame(mac(4), (ETH_P_8021Q, 10)))
        assert [(f[6:12], tag_text(f)) for f in collect(a, mac(4))] == [(mac(4), "")]


def test_a_bridge_with_vlan_protocol_802_1ad_tags_frames_with_88a8(ipr):
    links = vlan_aware_bridge(ipr, br_vlan_protocol=ETH_P_8021AD)
    assert info_data(ipr, links["kvbr"])["IFLA_BR_VLAN_PROTOCOL"] == ETH_P_8021AD
    a, b = capture_socket("kva1"), capture_socket("kvb1")
    with a, b:
        a.send(frame(mac(1), (ETH_P_8021Q, 7)))  # a customer's C-tag rides inside the S-VLAN
        assert [tag_text(f) for f in collect(b, mac(1))] == ["88a8/10 8100/7"]
        b.send(frame(mac(2), (ETH_P_8021AD, 10), (ETH_P_8021Q, 7)))
        assert [tag_text(f) for f in collect(a, mac(2))] == ["8100/7"]


def test_802_1q_and_802_1ad_vlan_devices_and_a_qinq_stack(ipr):
    lower = add(ipr, "kvd0", "dummy")
    s_vlan = add(ipr, "kvd0.100", "vlan", link=lower, vlan_id=100, vlan_protocol=ETH_P_8021AD)
    c_vlan = add(ipr, "kvd0.10", "vlan", link=lower, vlan_id=10)  # 802.1Q is the default
    stacked = add(ipr, "kvd0.100.10", "vlan", link=s_vlan, vlan_id=10, vlan_protocol=ETH_P_8021Q)
    seen = {name: info_data(ipr, i) for name, i in (("s", s_vlan), ("c", c_vlan), ("stacked", stacked))}
    assert {name: (d["IFLA_VLAN_ID"], d["IFLA_VLAN_PROTOCOL"]) for name, d in seen.items()} == {
        "s": (100, ETH_P_8021AD), "c": (10, ETH_P_8021Q), "stacked": (10, ETH_P_8021Q)}
    assert link(ipr, stacked).get_attr("IFLA_LINK") == s_vlan and link(ipr, s_vlan).get_attr("IFLA_LINK") == lower


def test_a_c_tagged_frame_through_an_802_1ad_vlan_device_leaves_with_both_tags(ipr):
    lower, far = veth(ipr, "kvl0", "kvl1")
    s_vlan = add(ipr, "kvl0.100", "vlan", link=lower, vlan_id=100, vlan_protocol=ETH_P_8021AD)
    up(ipr, lower, far, s_vlan)
    on_lower, on_far, sender = capture_socket("kvl0"), capture_socket("kvl1"), capture_socket("kvl0.100")
    with on_lower, on_far, sender:
        sender.send(frame(mac(5), (ETH_P_8021Q, 10)))
        assert [tag_text(f) for f in collect(on_lower, mac(5), outgoing=True)] == ["88a8/100 8100/10"]
        assert [tag_text(f) for f in collect(on_far, mac(5))] == ["88a8/100 8100/10"]


@pytest.mark.parametrize("mode", BOND_MODES)
def test_a_bond_of_dummy_slaves_in_each_mode_with_mtu_9000(ipr, mode):
    bond = add(ipr, "kvbond0", "bond", bond_mode=BOND_MODES[mode], bond_miimon=100)
    slaves = [add(ipr, f"kvs{n}", "dummy") for n in range(2)]
    for slave in slaves:
        ipr.link("set", index=slave, master=bond)  # down, as bonding requires
    up(ipr, bond, *slaves)
    ipr.link("set", index=bond, mtu=9000)
    data = info_data(ipr, bond)
    assert data["IFLA_BOND_MODE"] == BOND_MODES[mode]
    if mode == "active-backup":
        assert data["IFLA_BOND_ACTIVE_SLAVE"] in slaves
    links = read_links()  # the agent's own netlink reader
    assert (links["kvbond0"].kind, links["kvbond0"].mtu) == ("bond", 9000)
    assert [(links[f"kvs{n}"].master, links[f"kvs{n}"].mtu) for n in range(2)] == [(bond, 9000)] * 2
    for slave in slaves:
        slave_info = link(ipr, slave).get_attr("IFLA_LINKINFO")
        assert slave_info.get_attr("IFLA_INFO_SLAVE_KIND") == "bond"


def test_mtu_9000_on_a_bridge_and_a_vlan_device_and_no_more_than_the_lower_device(ipr):
    bridge = add(ipr, "kvbr", "bridge")
    ports = [veth(ipr, f"kvp{n}", f"kvq{n}")[0] for n in range(2)]
    for port in ports:
        ipr.link("set", index=port, mtu=9000)
        ipr.link("set", index=port, master=bridge)
    assert link(ipr, bridge).get_attr("IFLA_MTU") == 9000  # a bridge takes its ports' smallest MTU
    vlan = add(ipr, "kvp0.100", "vlan", link=ports[0], vlan_id=100, vlan_protocol=ETH_P_8021AD)
    assert link(ipr, vlan).get_attr("IFLA_MTU") == 9000
    with pytest.raises(NetlinkError) as refused:
        ipr.link("set", index=vlan, mtu=9001)
    assert refused.value.code in (22, 34), refused.value  # EINVAL / ERANGE
    assert link(ipr, vlan).get_attr("IFLA_MTU") == 9000


def test_the_post_start_link_check_follows_a_real_bond_and_its_slaves(ipr):
    """The agent's post-start check (plan.tapqinq.link_warnings) on links read from this kernel:
    a QinQ tap of MTU 1500 on an OVS bridge whose uplink is a bond needs 1504 on the bond and
    every slave; the kernel gives the slaves the bond's MTU, so one fix on the bond is enough."""
    vm = VmSpec(902, (), (TapQinQ(902, 0, QinQ(950)),))
    tap, _ = veth(ipr, "tap902i0", "kvtap902")  # the tap's kind does not matter to the check
    bond = add(ipr, "kvbond1", "bond", bond_mode=BOND_MODES["802.3ad"])
    for n in range(2):
        ipr.link("set", index=add(ipr, f"kvu{n}", "dummy"), master=bond)
    up(ipr, tap, bond)
    state = OvsState(ports=tuple(OvsPort(name, "vmbr0", interfaces=(OvsInterface(name),))
                                 for name in ("tap902i0", "kvbond1")))
    assert [w.link for w in link_warnings(vm, state, read_links())] == ["kvbond1", "kvu0", "kvu1"]
    ipr.link("set", index=bond, mtu=1504)
    assert link_warnings(vm, state, read_links()) == ()
