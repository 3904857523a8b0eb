"""VM-to-VM links as tables: the model, the spec file, corosync's node list, declaring,
the args of an end, and where a running end's socket must point."""

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from builders import vm_config
from pve_vhost_agent.errors import ConfigConflict, NotFound, SpecError
from pve_vhost_agent.formats.corosync import node_addresses
from pve_vhost_agent.formats.qemuargs import agent_args, merge_agent_args
from pve_vhost_agent.formats.specfile import format_spec, parse_spec
from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.model import names, spec
from pve_vhost_agent.model.linkactions import ConnectLink, DisconnectLink
from pve_vhost_agent.model.spec import ClusterSpec, LinkEnd, VhostNic, VmSpec
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.formats.qemunet import running_links
from pve_vhost_agent.model.links import Attached, LinkFacts, RunningLinks
from pve_vhost_agent.plan.links import (EndSocket, LinkPlan, add_link, connected_ends, end_socket, free_ports,
                                        plan_link_sockets, remove_link, start_notes, underlay_warning)
from pve_vhost_agent.plan.start import served_spec, start_config

MAC_A, MAC_B = "02:00:00:00:0A:01", "02:00:00:00:0B:01"
P0, P1 = spec.LINK_PORT_MIN, spec.LINK_PORT_MIN + 1
DIRS = {b: Path("/run/pve-vhost-agent") / b.value for b in spec.Backend}


def end(vmid=100, index=2, peer=(101, 3), port=P0, peer_port=P1, mac=MAC_A, mtu=1458) -> LinkEnd:
    return LinkEnd(vmid, index, mac, port, peer, peer_port, mtu)


def link(a=(100, 2), b=(101, 3), ports=(P0, P1), mtu=1458) -> tuple[LinkEnd, LinkEnd]:
    return (LinkEnd(a[0], a[1], MAC_A, ports[0], b, ports[1], mtu),
            LinkEnd(b[0], b[1], MAC_B, ports[1], a, ports[0], mtu))


# --- the model ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"peer": (100, 2)}, "cannot be linked to itself"),
    ({"port": 1000}, "outside 20000-29999"),
    ({"peer_port": 30000}, "outside 20000-29999"),
    ({"peer_port": P0}, "both ends of the link"),
    ({"mtu": 67}, "MTU 67 is outside"),
    ({"mtu": 65494}, "MTU 65494 is outside"),
    ({"mac": "01:00:5E:00:00:01"}, "multicast"),
    ({"peer": (101, 32)}, "outside 0-31"),
])
def test_a_bad_link_end_is_refused_with_one_line(kwargs, words):
    with pytest.raises(SpecError) as info:
        end(**kwargs)
    assert words in str(info.value) and ";" in str(info.value)


def test_a_link_end_names_itself_and_its_link_from_either_side():
    a, b = link()
    assert (a.end, a.peer_end, a.name) == ("100:net2", "101:net3", "net2")
    assert a.link_key == b.link_key == ((100, 2), (101, 3))
    assert a.mirrors(b) and b.mirrors(a)
    assert a.describe() == f"link to VM 101 net3, UDP port {P0} (peer {P1}), MAC {MAC_A}, MTU 1458"


def test_cluster_spec_refuses_a_port_or_mac_twice_and_a_netn_taken_by_a_nic():
    a, b = link()
    with pytest.raises(SpecError, match=f"link port {P0}"):
        ClusterSpec(links=(a, end(vmid=102, index=1, peer=(103, 1), port=P0, peer_port=P1 + 5, mac=MAC_B)))
    with pytest.raises(SpecError, match="of VM 100 net2 is already used by VM 100 net1"):
        ClusterSpec(nics=(VhostNic(100, 1, "br0", MAC_A),), links=(a,))
    with pytest.raises(SpecError, match="declared twice"):
        ClusterSpec(nics=(VhostNic(100, 2, "br0", "02:00:00:00:00:99"),), links=(a,))


def test_vm_spec_of_a_vm_with_only_link_ends_is_work_for_the_agent():
    a, b = link()
    cluster = ClusterSpec(links=(a, b))
    assert cluster.for_vm(100) == VmSpec(100, links=(a,)) and bool(cluster.for_vm(100))
    assert cluster.vmids() == [100, 101] and cluster.entry(101, 3) == b
    assert cluster.without(100, 2).links == (b,)


def test_half_links_and_ends_that_disagree_are_problems_not_refusals():
    a, b = link()
    assert ClusterSpec(links=(a, b)).link_problems() == ()
    (lost,) = ClusterSpec(links=(a,)).link_problems()
    assert "VM 100 net2 is linked to 101:net3, which declares no link end" in lost and "link remove 100:net2" in lost
    other_mtu = LinkEnd(101, 3, MAC_B, P1, (100, 2), P0, 1400)
    assert all("declared differently" in p for p in ClusterSpec(links=(a, other_mtu)).link_problems())


# --- names --------------------------------------------------------------------------


def test_end_names_and_runtime_netdev_ids_round_trip():
    assert names.end_name(100, 2) == "100:net2" and names.parse_end_name("100:net2") == (100, 2)
    assert [names.parse_end_name(t) for t in ("100:net32", "100:net02", "100-net2", "x:net1", "100:net")] == [None] * 5
    udp, hup = names.link_netdevs(2, ("127.0.0.1", P0), ("192.0.2.11", P1))
    assert (udp, hup) == (f"vhu-udp2-7f000001-{P0}-c000020b-{P1}", f"vhu-hup2-7f000001-{P0}-c000020b-{P1}")
    assert names.parse_link_netdev(udp) == ("udp", 2, ("127.0.0.1", P0), ("192.0.2.11", P1))
    six = names.link_netdevs(31, ("2001:db8::1", P0), ("2001:db8::2", P1))[1]
    assert names.parse_link_netdev(six) == ("hup", 31, ("2001:db8::1", P0), ("2001:db8::2", P1))
    assert names.parse_link_netdev("vhu-net2") is None and names.parse_link_netdev(udp + "0") is None
    assert names.link_hub(2) == 1002


# --- the spec file ------------------------------------------------------------------

LINKED = f"""\
link: 100-net2
\tpeer 101:net3
\tport {P0}
\tpeer-port {P1}
\tmac {MAC_A}
\tmtu 1458

"""


def test_a_link_section_reads_and_writes_every_key():
    (parsed,) = parse_spec(LINKED).links
    assert parsed == end()
    assert format_spec(ClusterSpec(links=(end(),))) == LINKED


@pytest.mark.parametrize("old, new, line, problem", [
    ("\tmtu 1458\n", "", 1, "no `mtu` line"),
    ("\tpeer 101:net3\n", "\tpeer 101-net3\n", 2, "link end '101-net3' is not <vmid>:net<N>"),
    (f"\tport {P0}\n", "\tport 2000\n", 1, "outside 20000-29999"),
    ("\tpeer 101:net3\n", "\tbridge vmbr0\n", 2, "unknown key 'bridge' in a link section"),
])
def test_a_bad_link_section_names_its_line(old, new, line, problem):
    with pytest.raises(SpecError) as info:
        parse_spec(LINKED.replace(old, new), "f.cfg")
    assert f"f.cfg line {line}" in str(info.value) and problem in str(info.value)


@st.composite
def linked_clusters(draw):
    count = draw(st.integers(0, 6))
    ends = []
    for n in range(count):
        a, b = (100 + 2 * n, draw(st.integers(0, 31))), (101 + 2 * n, draw(st.integers(0, 31)))
        mtu = draw(st.integers(spec.MTU_MIN, spec.LINK_MTU_MAX))
        ends += [LinkEnd(*a, f"02:00:00:01:{n:02X}:0A", P0 + 2 * n, b, P1 + 2 * n, mtu),
                 LinkEnd(*b, f"02:00:00:01:{n:02X}:0B", P1 + 2 * n, a, P0 + 2 * n, mtu)]
    return ClusterSpec(links=tuple(ends))


@settings(max_examples=100, deadline=None)
@given(cluster=linked_clusters())
def test_link_sections_round_trip(cluster):
    text = format_spec(cluster)
    assert parse_spec(text) == cluster and format_spec(parse_spec(text)) == text


# --- corosync.conf ------------------------------------------------------------------

COROSYNC = """\
logging {
  debug: off
  to_syslog: yes
}

nodelist {
  node {
    name: pve1
    nodeid: 1
    quorum_votes: 1
    ring0_addr: 192.0.2.11
  }
  node {
    name: pve2   # the second node
    nodeid: 2
    ring0_addr: 2001:db8::12
    ring1_addr: 198.51.100.12
  }
  node {
    nodeid: 3
  }
}

totem {
  cluster_name: lab
  interface {
    linknumber: 0
  }
}
"""


def test_corosync_node_list_gives_each_nodes_ring0_address():
    assert node_addresses(COROSYNC) == {"pve1": "192.0.2.11", "pve2": "2001:db8::12"}
    assert node_addresses("") == {}


@pytest.mark.parametrize("text, problem", [("nodelist {\n", "never closed"), ("}\n", "closes nothing"),
                                           ("nodelist {\n  node\n}\n", "not corosync's syntax")])
def test_a_broken_corosync_conf_is_named(text, problem):
    with pytest.raises(SpecError, match=problem):
        node_addresses(text)


# --- declaring ----------------------------------------------------------------------

CONFIGS = {100: vm_config(net0="virtio=BC:24:11:00:00:01,bridge=vmbr0"), 101: vm_config(), 102: vm_config()}


def macs():
    return iter(f"02:00:00:00:99:{n:02X}" for n in range(100))


def test_add_link_declares_both_ends_with_the_lowest_free_ports_and_new_macs():
    taken = end(vmid=102, index=1, peer=(102, 2), port=P0, peer_port=P0 + 2, mac="02:00:00:00:0C:01")
    mirror = LinkEnd(102, 2, "02:00:00:00:0C:02", P0 + 2, (102, 1), P0, 1458)
    cluster = add_link(ClusterSpec(links=(taken, mirror)), (100, 2), (101, 3), CONFIGS, 1400, (None, MAC_B), macs())
    a, b = cluster.entry(100, 2), cluster.entry(101, 3)
    assert (a.port, a.peer_port, b.port, b.peer_port) == (P1, P0 + 3, P0 + 3, P1)
    assert (a.mac, b.mac, a.mtu) == ("02:00:00:00:99:00", MAC_B, 1400) and a.mirrors(b)
    assert free_ports(cluster, 2) == (P0 + 4, P0 + 5)


def test_a_link_may_join_two_nics_of_one_vm():
    cluster = add_link(ClusterSpec(), (102, 1), (102, 2), CONFIGS, 1458, (), macs())
    assert [e.end for e in cluster.for_vm(102).links] == ["102:net1", "102:net2"]


@pytest.mark.parametrize("a, b, existing, error, words", [
    ((100, 0), (101, 1), (), ConfigConflict, "already has `net0: virtio=BC:24:11:00:00:01"),
    ((100, 1), (100, 1), (), SpecError, "two different NICs"),
    ((100, 1), (101, 1), (VhostNic(101, 1, "br0", "02:00:00:00:00:77"),), ConfigConflict, "vhost-user NIC"),
    ((100, 2), (102, 1), link(), ConfigConflict, "100:net2 is already linked to 101:net3"),
])
def test_add_link_refuses_a_taken_netn(a, b, existing, error, words):
    cluster = ClusterSpec(nics=tuple(e for e in existing if isinstance(e, VhostNic)),
                          links=tuple(e for e in existing if isinstance(e, LinkEnd)))
    with pytest.raises(error, match=words.replace("(", r"\(")):
        add_link(cluster, a, b, CONFIGS, 1458, (), macs())


def test_add_link_refuses_a_mac_the_vm_config_has():
    with pytest.raises(SpecError, match="BC:24:11:00:00:01 is already used"):
        add_link(ClusterSpec(), (100, 2), (101, 3), CONFIGS, 1458, ("BC:24:11:00:00:01",), macs())


def test_remove_link_from_either_end_removes_both_and_a_half_link_too():
    a, b = link()
    assert remove_link(ClusterSpec(links=(a, b)), (101, 3)) == ClusterSpec()
    assert remove_link(ClusterSpec(links=(a,)), (100, 2)) == ClusterSpec()
    with pytest.raises(NotFound, match="not the end of a link"):
        remove_link(ClusterSpec(links=(a, b)), (100, 3))


# --- the args of an end -------------------------------------------------------------


def test_a_link_end_is_a_virtio_device_in_its_slot_on_its_own_hub_and_needs_no_shared_memory():
    a, _ = link()
    plan = plan_args(VmSpec(100, links=(a,)), {"memory": "4096", "balloon": "1"}, (0, 0, 0), DIRS)
    assert plan.args == ("-netdev", "type=hubport,id=vhu-net2,hubid=1002",
                         "-device", f"virtio-net-pci,id=vhu-net2,netdev=vhu-net2,mac={MAC_A},bus=pci.0,addr=0x14,"
                                    "host_mtu=1458")
    assert agent_args(merge_agent_args("-cpu host", plan.args)) == plan.args  # owned by id, like a vhost-user NIC
    nic = VhostNic(100, 7, "vhostbr0", "02:00:00:00:00:07")
    both = plan_args(VmSpec(100, (nic,), links=(a,)), {"memory": "4096", "balloon": "0"}, (7, 2, 0), DIRS).args
    assert both[:4] == ("-object", "memory-backend-memfd,id=vhu-mem,size=4096M,share=on",
                        "-machine", "memory-backend=vhu-mem")
    assert both[4:8] == plan.args and "id=vhu-net7," in both[-1] and "bus=pci.1,addr=0x2" in both[-1]


@pytest.mark.parametrize("config, words", [
    ({"net2": "virtio=BC:24:11:00:00:01,bridge=vmbr0"}, r"net2 of VM 100 is both a Proxmox NIC in the VM config and "
     r"the link end 100:net2 in the spec; remove the link \(pve-vhost-agent link remove 100:net2\) and add it on a "
     r"free netN, or remove the Proxmox NIC \(qm set 100 --delete net2\)"),
    ({"net0": f"virtio={MAC_A},bridge=vmbr0"}, f"MAC {MAC_A} of link end 100:net2 is also the MAC of Proxmox NIC net0 "
     r"of VM 100; give that Proxmox NIC another MAC \(qm set 100 --net0 ...\)"),
    ({"args": "-netdev hubport,id=mine,hubid=1002"}, "joins QEMU hub 1002"),
    ({"args": "-device e1000,bus=pci.0,addr=0x14"}, "takes pci.0 slot 0x14"),
])
def test_a_link_end_refuses_what_clashes_with_it(config, words):
    a, _ = link()
    with pytest.raises(ConfigConflict, match=words):
        plan_args(VmSpec(100, links=(a,)), {"memory": "512", **config}, (0, 0, 0), DIRS)


def test_a_migration_serves_exactly_the_link_ends_the_vm_runs_with():
    a, _ = link()
    later = end(index=5, peer=(101, 6), port=P0 + 8, peer_port=P0 + 9, mac="02:00:00:00:0A:05")
    running = plan_args(VmSpec(100, links=(a,)), {"memory": "512"}, (0, 0, 0), DIRS).args
    config = VmConfig.parse(f"memory: 512\nargs: {' '.join(running)}\n")
    served = served_spec(VmSpec(100, links=(a, later)), start_config(config, "nodeA"))
    assert served.links == (a,)


# --- where a running end points -----------------------------------------------------

ADDRESSES = {"pve1": "192.0.2.11", "pve2": "192.0.2.12", "pve6": "2001:db8::16"}


@pytest.mark.parametrize("here, peer_node, expected", [
    ("pve1", "pve1", EndSocket(("127.0.0.1", P0), ("127.0.0.1", P1), "pve1")),
    ("pve1", "pve2", EndSocket(("192.0.2.11", P0), ("192.0.2.12", P1), "pve2")),
    ("pve1", None, "VM 101 has no config on any node"),
    ("pve1", "pve9", "node pve9 has no ring0_addr in corosync.conf"),
    ("pve1", "pve6", "have addresses of different IP versions"),
])
def test_an_end_talks_over_loopback_on_one_node_and_over_ring0_between_nodes(here, peer_node, expected):
    got = end_socket(end(), here, peer_node, ADDRESSES)
    assert got == expected if isinstance(expected, EndSocket) else expected in got


LOCAL = EndSocket(("127.0.0.1", P0), ("127.0.0.1", P1), "pve1")
REMOTE = EndSocket(("192.0.2.11", P0), ("192.0.2.12", P1), "pve2")


def attached(sock: EndSocket, index=2) -> Attached:
    udp, hup = names.link_netdevs(index, sock.local, sock.remote)
    return Attached(index, sock.local, sock.remote, (hup, udp))


def running(*sockets: EndSocket, devices=frozenset({2})) -> RunningLinks:
    return RunningLinks(frozenset(devices), tuple(attached(s) for s in sockets))


def test_a_running_end_gets_its_socket_once_and_follows_its_peer_to_another_node():
    a, _ = link()
    first = plan_link_sockets(100, (a,), {2: LOCAL}, running())
    assert first == LinkPlan((ConnectLink(100, "net2", LOCAL.local, LOCAL.remote, "101:net3", "pve1"),))
    assert first.actions[0].sentence() == f"connect link net2 to 101:net3 on pve1 (127.0.0.1:{P0} -> 127.0.0.1:{P1})"
    assert plan_link_sockets(100, (a,), {2: LOCAL}, running(LOCAL)) == LinkPlan()
    assert connected_ends((a,), {2: LOCAL}, running(LOCAL)) == (a,)
    (moved,) = plan_link_sockets(100, (a,), {2: REMOTE}, running(LOCAL)).actions
    assert moved.replaces == attached(LOCAL).netdevs and moved.sentence().startswith("re-point link net2")
    assert connected_ends((a,), {2: REMOTE}, running(LOCAL)) == ()
    (twice,) = plan_link_sockets(100, (a,), {2: LOCAL}, running(LOCAL, REMOTE)).actions
    assert twice.replaces == attached(LOCAL).netdevs + attached(REMOTE).netdevs


def test_a_removed_link_is_disconnected_a_dark_one_too_and_a_new_one_waits_for_the_next_start():
    a, _ = link()
    (gone,) = plan_link_sockets(100, (), {}, running(LOCAL)).actions
    assert gone == DisconnectLink(100, "net2", attached(LOCAL).netdevs, "no link is declared on it any more")
    dark = plan_link_sockets(100, (a,), {2: "VM 101 has no config on any node"}, running(LOCAL))
    assert isinstance(dark.actions[0], DisconnectLink) and "is dark: VM 101 has no config" in dark.dark[0]
    assert plan_link_sockets(100, (a,), {2: LOCAL}, running(devices=())) == LinkPlan(waiting=(
        "VM 100 net2: the link to 101:net3 waits for the VM's next start (its running QEMU has no such device)",))


@pytest.mark.parametrize("address, mtu, link_mtu, words", [
    ("192.0.2.11", 1500, 1458, None),
    ("192.0.2.11", 1500, 1500, "needs an underlay MTU of 1542 (IPv4: 42 bytes of tunnel), but eth0 has 1500"),
    ("2001:db8::1", 1500, 1458, "needs an underlay MTU of 1520 (IPv6: 62 bytes"),
    ("2001:db8::1", 1500, 1438, None),
    ("192.0.2.11", 9000, 8958, None),
    ("192.0.2.11", None, 1458, "no interface of this node has its cluster address 192.0.2.11"),
])
def test_the_underlay_must_carry_a_whole_guest_frame(address, mtu, link_mtu, words):
    warning = underlay_warning(end(mtu=link_mtu), address, "eth0", mtu)
    assert warning is None if words is None else words in warning
    if warning and mtu:
        assert f"--mtu {mtu - (42 if '.' in address else 62)}" in warning


# --- what a running QEMU says, and what a start says ----------------------------------

INFO_NETWORK = (  # QEMU 7.2 and 10.0 print it alike
    "hub 1002\r\n"
    f" \\ vhu-hup2-7f000001-{P0}-7f000001-{P1}: vhu-udp2-7f000001-{P0}-7f000001-{P1}: index=0,type=dgram,fd=11 inet\r\n"
    " \\ vhu-net2: vhu-net2: index=0,type=nic,model=virtio-net-pci,macaddr=02:00:00:00:0a:01\r\n"
    "hub 1005\r\n"
    " \\ vhu-net5: vhu-net5: index=0,type=nic,model=virtio-net-pci,macaddr=02:00:00:00:0a:05\r\n"
    "hub 0\r\n \\ hub0port0: user.0: index=0,type=user,net=10.0.2.0\r\n"
    f"vhu-udp7-7f000001-{P0 + 4}-7f000001-{P0 + 5}: index=0,type=dgram,fd=12 inet\r\n"
    "net0: index=0,type=tap,ifname=tap100i0,script=/var/lib/qemu-server/pve-bridge\r\n"
)


def test_info_network_gives_the_hubs_and_the_sockets_on_them_hub_port_first():
    found = running_links(INFO_NETWORK)
    assert found.devices == frozenset({2, 5})
    assert found.attached == (
        attached(LOCAL),
        Attached(7, ("127.0.0.1", P0 + 4), ("127.0.0.1", P0 + 5), (f"vhu-udp7-7f000001-{P0 + 4}-7f000001-{P0 + 5}",)),
    )
    assert running_links("") == RunningLinks()


def test_a_start_says_where_each_end_will_point_and_warns_when_the_underlay_is_too_small():
    a, _ = link()
    near = end(index=4, peer=(102, 1), port=P0 + 6, peer_port=P0 + 7, mac="02:00:00:00:0A:04")
    lost = end(index=5, peer=(103, 1), port=P0 + 8, peer_port=P0 + 9, mac="02:00:00:00:0A:05", mtu=1500)
    facts = LinkFacts("pve1", {101: "pve2", 102: "pve1", 103: None}, ADDRESSES, ("vmbr0", 1500))
    notes, warnings = start_notes((lost, near, a), facts)
    assert notes == (f"link net2 to 101:net3 on node pve2: UDP 192.0.2.11:{P0} -> 192.0.2.12:{P1} once QEMU runs",
                     f"link net4 to 102:net1 on this node: UDP 127.0.0.1:{P0 + 6} -> 127.0.0.1:{P0 + 7} once QEMU runs")
    assert warnings == ("VM 100 net5: the link to 103:net1 stays dark: VM 103 has no config on any node",)
    far = LinkFacts("pve1", {101: "pve2"}, ADDRESSES, ("vmbr0", 1400))
    (warning,) = start_notes((a,), far)[1]
    assert "needs an underlay MTU of 1500" in warning and "vmbr0 has 1400" in warning


def test_nic_and_qinq_commands_refuse_a_link_end():
    from pve_vhost_agent.model.fields import NicChange
    from pve_vhost_agent.plan import declare

    a, b = link()
    cluster = ClusterSpec(links=(a, b))
    config = vm_config()
    with pytest.raises(ConfigConflict, match="net2 is the end of a link to 101:net3"):
        declare.add_nic(cluster, 100, 2, NicChange({"bridge": "br0"}), config, macs())
    for rule in (lambda: declare.set_nic(cluster, 100, 2, NicChange({"queues": 2}), config),
                 lambda: declare.remove_nic(cluster, 100, 2)):
        with pytest.raises(ConfigConflict, match="not a vhost-user NIC"):
            rule()
    with pytest.raises(ConfigConflict, match="QinQ is for Proxmox's own NICs"):
        declare.set_tap_qinq(cluster, 100, 2, spec.QinQ(950), config)
    with pytest.raises(SpecError, match=f"MAC {MAC_A} is already used by VM 100 net2"):
        declare.add_nic(cluster, 100, 1, NicChange({"bridge": "br0", "mac": MAC_A}), config, macs())
