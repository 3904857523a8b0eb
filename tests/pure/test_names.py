"""Each name the agent makes is parsed by what makes it: a round trip, and nothing else."""

import pytest

from pve_vhost_agent.model import names
from pve_vhost_agent.model.spec import TapQinQ, QinQ, VhostNic


def test_a_nic_declares_its_names_through_the_one_template():
    nic = VhostNic(100, 31, "vhostbr0", "02:00:00:00:00:01")
    assert (nic.name, nic.port_name, nic.socket_name) == ("net31", "vhu100i31", "vm-100-31.sock")
    assert TapQinQ(100, 3, QinQ(950)).port_name == "tap100i3"
    assert names.SECTION(100, 3) == "100-net3" and names.args_nic_id(3) == "vhu-net3"


@pytest.mark.parametrize("template", [names.SOCKET, names.VHOST_PORT, names.TAP, names.SECTION])
@pytest.mark.parametrize("vmid,index", [(100, 0), (100, 31), (999999999, 7), (1, 10)])
def test_names_round_trip(template, vmid, index):
    assert template.parse(template(vmid, index)) == (vmid, index)


@pytest.mark.parametrize("name", ["vm-100-32.sock", "vm-100-01.sock", "vm-100-x.sock", "vm-100-1.sock.tmp",
                                  "other.sock", "vm-0100-1.sock", "vm--1-1.sock"])
def test_socket_names_the_agent_does_not_make_are_not_its(name):
    assert names.socket_vmid(name) is None


def test_nic_and_args_ids_parse_only_what_they_make():
    assert names.nic_index("net0") == 0 and names.nic_index("net31") == 31
    assert [names.nic_index(n) for n in ("net32", "net01", "net", "net-1", "vhu-net1", " net1")] == [None] * 6
    assert names.args_nic_index("vhu-net5") == 5
    assert [names.args_nic_index(n) for n in ("vhu-net32", "vhu-net05", "vhu-mem", "net5")] == [None] * 4


@pytest.mark.parametrize("name,guest", [("tap100i0", True), ("veth200i1", True), ("fwln100i0", True),
                                        ("fwpr100p0", True), ("eno1", False), ("bond0", False),
                                        ("vmbr0", False), ("tap100", False)])
def test_guest_devices_are_told_from_uplinks(name, guest):
    assert names.is_guest_device(name) is guest


def test_the_agent_hook_is_recognised_on_any_storage():
    assert names.hook_volume("local") == "local:snippets/pve-vhost-agent"
    assert names.is_agent_hook("nfs1:snippets/pve-vhost-agent")
    assert not names.is_agent_hook("local:snippets/other.pl") and not names.is_agent_hook(None)


@pytest.mark.parametrize("bridge, ethertype, stag, role, name", [
    ("vmbr0", "802.1ad", 950, "", "vmbr0a950"), ("vmbr0", "802.1q", 1, "u", "vmbr0q1u"),
    ("vmbr12", "802.1ad", 4094, "t", "vmbr12a4094t"), ("br9a1", "802.1q", 20, "p", "br9a1q20p"),
])
def test_s_vlan_device_names_round_trip(bridge, ethertype, stag, role, name):
    assert names.svlan_device(bridge, ethertype, stag, role) == name
    assert names.parse_svlan_device(name) == (bridge, ethertype, stag, role)


@pytest.mark.parametrize("name", ["vmbr0v950", "vmbr0a0950", "vmbr0a", "vmbr0a950x", "a950", "vmbr0.950"])
def test_names_the_agent_does_not_make_for_an_s_vlan_are_not_its(name):
    assert names.parse_svlan_device(name) is None


def test_proxmoxs_own_vlan_bridge_and_firewall_bridge_are_told_apart():
    assert names.pve_vlan_bridge("vmbr0", 950) == "vmbr0v950"
    assert names.is_firewall_bridge("fwbr100i0") and not names.is_firewall_bridge("vmbr0")
