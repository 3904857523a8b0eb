"""The host network doctor's checks as tables: a seed-style host (tests/builders.py), one fault
at a time, and the finding that names it (plan/doctor.py, doctor_net.py, doctor_ovs.py, doctor_links.py)."""

import dataclasses

import pytest

from builders import (
    SEED_INTERFACES, host_facts, host_link, host_net, nic, ovs_state, seed_links, seed_network_file, tap_port, vm_config,
)
from pve_vhost_agent.model.findings import Finding, Severity, error_count, sorted_findings
from pve_vhost_agent.model.hostnet import BondSlaveState, BondState, BridgeState, VlanState
from pve_vhost_agent.model.ovs import FrozenMap, OvsBridge, OvsInterface, OvsPort
from pve_vhost_agent.model.links import LinkFacts
from pve_vhost_agent.model.spec import LINK_PORT_MIN, ClusterSpec, LinkEnd, QinQ, TapQinQ, VlanPolicy
from pve_vhost_agent.plan.doctor import DoctorInput, diagnose
from pve_vhost_agent.plan.observed import LocalVm

HOOK = "hookscript: local:snippets/pve-vhost-agent\n"
ROUTER = "balloon: 0\nmemory: 4096\nname: router\n"


def seed(links=None, text=SEED_INTERFACES, ip_forward="1", vms=(), **kw) -> DoctorInput:
    """The seed host with no VM declarations: OVS is not needed, and not running."""
    return DoctorInput(network_file=seed_network_file(text), net=host_net(links or seed_links(), ip_forward),
                       facts=host_facts(), ovs_problem="cannot reach OVSDB at unix:/run/x.sock", vms=tuple(vms),
                       cluster_vmids=frozenset(vm.vmid for vm in vms), **kw)


def changed(name, **fields):
    links = seed_links()
    links[name] = dataclasses.replace(links[name], **fields)
    return links


def without(*names):
    links = seed_links()
    for name in names:
        del links[name]
    return links


def vm(vmid=100, body=ROUTER, **keys):
    return LocalVm(vmid, vm_config(body, **keys))


def found(inp, severity=None):
    return [(f.severity.value, f.subject, f.check) for f in diagnose(inp)
            if severity is None or f.severity.value == severity]


def test_the_healthy_seed_host_has_nothing_but_the_idle_switch():
    assert found(seed()) == [("info", "Open vSwitch", "ovs-unreachable")]


NET_FAULTS = [
    # drift: file against kernel
    ("auto interface missing (a renamed NIC)", seed(without("eno2")),
     ("error", "eno2", "drift-missing"), "declares eno2 (needed by an auto interface), but the kernel has no such"),
    ("bond mode", seed(changed("bond0", bond=BondState("active-backup", 100, 0, "layer2"))),
     ("warning", "bond0", "drift-bond-mode"), "declares bond-mode 802.3ad, but the kernel runs bond-mode active-backup"),
    ("slave set", seed(changed("eno2", master="", bond_slave=None)),
     ("warning", "bond0", "drift-bond-slaves"), "declares bond-slaves eno1 eno2, but the kernel runs slaves eno1"),
    ("MTU", seed(changed("vmbr0.50", mtu=1500)),
     ("warning", "vmbr0.50", "drift-mtu"), "declares MTU 9000, but the kernel runs MTU 1500"),
    ("VLAN id", seed(changed("vmbr0.50", vlan=VlanState(60, "802.1q"))),
     ("warning", "vmbr0.50", "drift-vlan-id"), "declares VLAN 50, but the kernel runs VLAN 60"),
    ("VLAN protocol", seed(changed("vmbr0.50", vlan=VlanState(50, "802.1ad"))),
     ("warning", "vmbr0.50", "drift-vlan-protocol"), "declares vlan-protocol 802.1q, but the kernel runs 802.1ad"),
    ("not VLAN-aware", seed(changed("vmbr0", bridge=BridgeState())),
     ("warning", "vmbr0", "drift-bridge-vlan-aware"), "bridge-vlan-aware yes, but the kernel runs VLAN filtering off"),
    ("VLANs missing on an uplink", seed(changed("bond0", vids=(1, 10))),
     ("warning", "vmbr0", "drift-bridge-vids"), "declares bridge-vids 2-4094, but the kernel runs port bond0 without "
                                                "VLANs 2-9,11-4094"),
    ("a bond only the kernel has", seed({**seed_links(), "bond9": host_link("bond9", "bond", bond=BondState(
        "active-backup", 100))}), ("warning", "bond9", "drift-undeclared"), "gone after a reboot"),
    # MTU chains
    ("a slave's MTU below the bond's", seed(changed("eno1", mtu=1500)),
     ("error", "eno1", "mtu-bond-slave"), "MTU 1500 differs from its bond bond0's MTU 9000"),
    ("a bridge above its port", seed(changed("vmbr0", mtu=9216)),
     ("error", "vmbr0", "mtu-bridge-port"), "bridge MTU 9216 is above the MTU 9000 of its port bond0"),
    # bonds
    ("a slave without carrier", seed(changed("eno2", carrier=False)),
     ("warning", "eno2", "bond-slave-down"), "slave of bond0 has no carrier, so the bond runs without redundancy"),
    ("every slave down", seed({**changed("eno1", up=False), "eno2": dataclasses.replace(
        seed_links()["eno2"], carrier=False)}), ("error", "bond0", "bond-down"), "eno1: is down; eno2: has no carrier"),
    ("no LACP partner", seed(seed_links(partner="00:00:00:00:00:00")),
     ("error", "bond0", "bond-lacp-partner"), "the switch does not answer LACP on eno1, eno2"),
    ("slaves in different aggregators", seed(changed("eno2", bond_slave=BondSlaveState(True, False, 2))),
     ("warning", "eno2", "bond-lacp-aggregator"), "sits in aggregator 2, not in the active aggregator 1"),
    ("miimon 0", seed(changed("bond0", bond=BondState("802.3ad", 0, 0, "layer3+4", 1, "52:54:00:00:00:99")),
                      SEED_INTERFACES.replace("bond-miimon 100", "bond-miimon 0")),
     ("warning", "bond0", "bond-miimon"), "a failed link is never noticed"),
    # bridges
    ("STP with a forward delay", seed(changed("vmbr1", bridge=BridgeState(stp=True, forward_delay=15.0)),
                                      SEED_INTERFACES.replace("bridge-ports none\n\tbridge-stp off",
                                                              "bridge-ports none\n\tbridge-stp on")),
     ("warning", "vmbr1", "bridge-stp-delay"), "listens and learns for 30 s before it forwards"),
    ("a VM tag outside bridge-vids", seed(text=SEED_INTERFACES.replace("bridge-vids 2-4094", "bridge-vids 10 20"),
                                          vms=[vm(net0="virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=30")]),
     ("error", "VM 100 net0", "vm-tag-outside-vids"), "VLAN 30 is not among the VLANs vmbr0 carries (bridge-vids 10,20)"),
    ("NAT without forwarding", seed(ip_forward="0"),
     ("error", "vmbr1", "nat-forwarding"), "masquerades the traffic of vmbr1, but net.ipv4.ip_forward is 0"),
]


def test_a_vm_tag_without_bridge_vids_is_judged_by_the_uplinks_vlans_in_the_kernel():
    links = changed("bond0", vids=(1, 10, 20))
    text = SEED_INTERFACES.replace("\tbridge-vids 2-4094\n", "")
    tagged = [vm(net0="virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=20",
                 net1="virtio=BC:24:11:00:00:02,bridge=vmbr0,trunks=10;30-31")]
    assert [(f.subject, f.problem) for f in diagnose(seed(links, text, vms=tagged)) if f.severity is Severity.ERROR] == [
        ("VM 100 net1", "VLAN 30-31 is not among the VLANs vmbr0 carries (on bond0: 1,10,20): "
                        "those frames never leave the host")]


def test_proxmox_own_devices_are_not_drift():
    """Taps, firewall bridges and the `vmbr0v10` bridges Proxmox makes for tagged NICs on a
    bridge that is not VLAN-aware are not in /etc/network/interfaces, and need not be."""
    links = seed_links()
    links.update({name: host_link(name, kind, **kw) for name, kind, kw in [
        ("tap100i0", "tun", {"master": "vmbr0", "mtu": 1500}), ("fwbr100i1", "bridge", {"bridge": BridgeState()}),
        ("fwpr100p1", "veth", {"master": "vmbr0"}), ("vmbr1v10", "bridge", {"mtu": 1500, "bridge": BridgeState()}),
        ("eno3", "", {"mtu": 1500}), ("eno3.10", "vlan", {"mtu": 1500, "lower": "eno3", "master": "vmbr1v10",
                                                          "vlan": VlanState(10, "802.1q")})]})
    assert found(seed(links), "warning") == [] and found(seed(links), "error") == []


def test_a_host_without_an_interfaces_file_still_gets_its_kernel_checked():
    inp = dataclasses.replace(seed(changed("eno1", mtu=1500)), network_file=None)
    assert found(inp) == [("error", "eno1", "mtu-bond-slave"), ("info", "/etc/network/interfaces", "interfaces-missing"),
                          ("info", "Open vSwitch", "ovs-unreachable")]


def test_netlink_that_cannot_be_read_is_one_error_not_a_crash():
    inp = dataclasses.replace(seed(), net=None, net_problem="cannot read the network links through netlink: EPERM")
    assert ("error", "netlink", "netlink-unreadable") in found(inp)


def test_a_double_tagged_vlan_device_needs_four_bytes_more_below():
    links = seed_links()
    links["vmbr0.50.7"] = host_link("vmbr0.50.7", "vlan", lower="vmbr0.50", vlan=VlanState(7, "802.1q"))
    text = SEED_INTERFACES + "\nauto vmbr0.50.7\niface vmbr0.50.7 inet manual\n\tmtu 9000\n"
    [qinq] = [f for f in diagnose(seed(links, text)) if f.check == "mtu-qinq"]
    assert "needs MTU 9004 there, but vmbr0 has 9000" in qinq.problem


# --- Open vSwitch and OVS-DPDK for declared NICs -------------------------------------------

VHOST = nic(1, "vhostbr0", vlan=VlanPolicy(qinq=QinQ(950)))
UPLINK = OvsPort("bond0", "vhostbr0", interfaces=(OvsInterface("bond0"),))
NO_VHOST = ("internal", "system", "tap")
DPDK_READY = {"dpdk-init": "true", "pmd-maxsleep": "50000", "per-port-memory": "true"}


def declared(ovs, spec=ClusterSpec(nics=(VHOST,)), config=ROUTER + HOOK, facts=None, links=None, **kw) -> DoctorInput:
    return DoctorInput(network_file=seed_network_file(), net=host_net(links or seed_links()),
                       facts=facts or host_facts(), ovs=ovs, spec=spec, vms=(vm(100, config),),
                       cluster_vmids=frozenset({100}), **kw)


def dpdk(*ports, other_config=DPDK_READY, **kw):
    state = ovs_state(*ports, **kw)
    return dataclasses.replace(state, other_config=FrozenMap({**state.other_config, **other_config}),
                               dpdk_initialized=True, dpdk_version="DPDK 22.11.11")


def test_a_ready_ovs_dpdk_for_a_declared_qinq_nic_has_nothing_to_say():
    assert found(declared(dpdk(UPLINK, vlan_limit="2"), links=changed("bond0", mtu=9000))) == []


OVS_FAULTS = [
    ("OVS down with NICs declared", declared(None, ovs_problem="cannot reach OVSDB at unix:/x (No such file)"),
     ("error", "Open vSwitch", "ovs-unreachable"), "declare 1 vhost-user NIC and 0 QinQ taps"),
    ("dpdk-init unset", declared(dpdk(other_config={"dpdk-init": ""})),
     ("error", "Open vSwitch other_config:dpdk-init", "dpdk-init"), "is unset"),
    ("DPDK failed to initialise (no vhost-user types then)", declared(dataclasses.replace(
        dpdk(iface_types=NO_VHOST), dpdk_initialized=False)),
     ("error", "Open vSwitch dpdk_initialized", "dpdk-initialized"), "DPDK did not start"),
    ("the running switch is not the DPDK build", declared(dataclasses.replace(
        dpdk(iface_types=NO_VHOST), dpdk_initialized=False, dpdk_version="none")),
     ("error", "ovs-vswitchd", "dpdk-binary"), "the running ovs-vswitchd is not the DPDK build"),
    ("an older switch that does not tell its DPDK version", declared(dataclasses.replace(
        dpdk(iface_types=NO_VHOST), dpdk_initialized=None, dpdk_version="")),
     ("error", "ovs-vswitchd", "dpdk-binary"), "the running ovs-vswitchd is not the DPDK build"),
    ("the alternative is not the DPDK build", declared(dpdk(), facts=host_facts(
        alternative="/usr/lib/openvswitch-switch/ovs-vswitchd")), ("error", "ovs-vswitchd", "dpdk-alternative"),
     "points to /usr/lib/openvswitch-switch/ovs-vswitchd"),
    ("no ring mempool driver", declared(dpdk(), facts=host_facts(packages=("openvswitch-switch-dpdk",))),
     ("error", "package librte-mempool-ring*", "dpdk-mempool-ring"), "Failed to create mempool"),
    ("a small host without pmd-maxsleep", declared(dataclasses.replace(dpdk(), other_config=FrozenMap(
        {"dpdk-init": "true", "vlan-limit": "2"})), facts=host_facts(cpus=4, mem_gib=16)),
     ("warning", "Open vSwitch other_config:pmd-maxsleep", "dpdk-pmd-maxsleep"), "(4 CPUs, 16 GiB)"),
    ("a small host without per-port-memory", declared(dataclasses.replace(dpdk(), other_config=FrozenMap(
        {"dpdk-init": "true", "vlan-limit": "2"})), facts=host_facts(cpus=4, mem_gib=16)),
     ("warning", "Open vSwitch other_config:per-port-memory", "dpdk-per-port-memory"), "stalls ovs-vswitchd"),
    ("vlan-limit 1 with QinQ declared", declared(dpdk(vlan_limit="1", probed=(("netdev", "1"),))),
     ("error", "Open vSwitch other_config:vlan-limit", "ovs-vlan-limit"), "is 1, but this node's VMs declare QinQ"),
    ("a datapath probed with one VLAN header", declared(dpdk(vlan_limit="2", probed=(("netdev", "1"),))),
     ("error", "Open vSwitch netdev datapath", "ovs-vlan-depth"), "was probed with 1 VLAN header "),
    ("a QinQ NIC whose uplink lacks the S-tag's 4 bytes", declared(dpdk(UPLINK), links=changed("bond0", mtu=1500) | {
        "eno1": host_link("eno1", mtu=1500, master="bond0"), "eno2": host_link("eno2", mtu=1500, master="bond0")}),
     ("error", "VM 100 net1", "mtu-ovs-uplink"), "uplink bond0 of bridge vhostbr0 has MTU 1500, but the NIC's frames "
                                                 "need 1504 (MTU 1500 + 4 for the S-tag)"),
    ("a jumbo vhost-user NIC on a 1500 DPDK uplink", declared(dpdk(OvsPort("dpdk0", "vhostbr0", interfaces=(
        OvsInterface("dpdk0", "dpdk", mtu=1500),))), spec=ClusterSpec(nics=(nic(1, mtu=9000),))),
     ("error", "VM 100 net1", "mtu-ovs-uplink"), "uplink dpdk0 of bridge vhostbr0 has MTU 1500, but the NIC's frames "
                                                 "need 9000 (its MTU 9000)"),
    ("a vhost-user NIC on a kernel-datapath bridge", declared(dpdk(bridges=(OvsBridge("vhostbr0", ""),))),
     ("error", "VM 100 net1", "vhost-bridge-datapath"), "uses the system datapath"),
    ("not enough hugepages for a hugepage VM", declared(
        dpdk(), config=ROUTER.replace("4096", "65536") + HOOK + "numa: 1\nhugepages: 1024\n",
        facts=host_facts(available_gib=10, hugepages={1048576: 2})),
     ("warning", "VM 100", "hugepages"), "needs 64 1024 MiB hugepages but 2 are free"),
]


@pytest.mark.parametrize("what, inp, expected, words", NET_FAULTS + OVS_FAULTS,
                         ids=[row[0] for row in NET_FAULTS + OVS_FAULTS])
def test_each_fault_is_named(what, inp, expected, words):
    findings = diagnose(inp)
    match = [f for f in findings if (f.severity.value, f.subject, f.check) == expected]
    assert match, [str(f) for f in findings]
    assert words in match[0].problem + match[0].fix
    assert match[0].fix and "\n" not in str(match[0])
    # One cause, named once: a failed DPDK is not also "not the DPDK build", and so on.
    assert len({f.check for f in findings if f.check.startswith("dpdk-") and f.severity is Severity.ERROR}) <= 1


def test_a_qinq_tap_without_mtu_gets_its_bridges_mtu_and_then_needs_four_bytes_more():
    """Proxmox gives a tap its bridge's MTU: the uplink that set it is then 4 bytes short."""
    spec = ClusterSpec(tap_qinq=(TapQinQ(100, 0, QinQ(950)),))
    state = dpdk(UPLINK, tap_port("tap100i0", "vhostbr0"))
    links = {**seed_links(), "vhostbr0": host_link("vhostbr0", "tun")}
    inp = declared(state, spec, ROUTER + HOOK + "net0: virtio=BC:24:11:00:00:01,bridge=vhostbr0,tag=950\n", links=links)
    assert [f.problem for f in diagnose(inp) if f.check == "mtu-ovs-uplink"] == [
        f"uplink {n} of bridge vhostbr0 has MTU 9000, but the NIC's frames need 9004 (MTU 9000 + 4 for the S-tag): "
        "full-size frames are dropped" for n in ("bond0",)]


# --- the agent's own state ----------------------------------------------------------------------


def test_declarations_of_a_vm_that_no_longer_exists():
    inp = dataclasses.replace(seed(), spec=ClusterSpec(nics=(nic(1, vmid=555),)))
    [gone] = [f for f in diagnose(inp) if f.check == "spec-without-vm"]
    assert str(gone) == ("warning: VM 555: /etc/pve/pve-vhost-agent/555.cfg declares net1, but no node has a VM 555 "
                         "(destroyed?); remove the file: rm /etc/pve/pve-vhost-agent/555.cfg")


def test_the_agents_args_without_its_hookscript():
    args = ("args: -chardev socket,id=vhu-net1,path=/run/pve-vhost-agent/ovs/vm-100-1.sock,server=on,wait=off "
            "-netdev type=vhost-user,id=vhu-net1,chardev=vhu-net1\n")
    inp = dataclasses.replace(seed(), vms=(vm(100, ROUTER + args + "hookscript: local:snippets/other.pl\n"),),
                              cluster_vmids=frozenset({100}))
    [finding] = [f for f in diagnose(inp) if f.check == "args-without-hookscript"]
    assert finding.severity is Severity.ERROR and "hookscript is local:snippets/other.pl" in finding.problem
    assert "`pve-vhost-agent enable 100`" in finding.fix


def test_findings_sort_errors_first_and_count():
    findings = sorted_findings([Finding(Severity.INFO, "a", "p", "f"), Finding(Severity.ERROR, "z", "p", "f"),
                                Finding(Severity.WARNING, "b", "p", "f"), Finding(Severity.ERROR, "z", "p", "f")])
    assert [f.severity.value for f in findings] == ["error", "warning", "info"] and error_count(findings) == 1
    assert str(findings[0]) == "error: z: p; f"


# --- VM-to-VM links ---------------------------------------------------------------------------

PORTS = (LINK_PORT_MIN, LINK_PORT_MIN + 1)
CLUSTER = {"pve1": "192.0.2.11", "pve2": "192.0.2.12"}


def linked(peer_node="pve2", underlay=("eno1", 1500), mtu=1458, addresses=CLUSTER, peer_declared=True,
           **kw) -> DoctorInput:
    """VM 100 of this node (pve1), its net2 linked to VM 101 net3 on `peer_node`."""
    here = LinkEnd(100, 2, "02:00:00:00:0A:01", PORTS[0], (101, 3), PORTS[1], mtu)
    there = LinkEnd(101, 3, "02:00:00:00:0B:01", PORTS[1], (100, 2), PORTS[0], mtu)
    facts = LinkFacts("pve1", {101: peer_node}, addresses, underlay)
    spec = ClusterSpec(links=(here, there) if peer_declared else (here,))
    return dataclasses.replace(seed(), vms=(vm(100, ROUTER + HOOK),), cluster_vmids=frozenset({100, 101}),
                               spec=spec, **{"links": facts, **kw})


def link_found(inp):
    return [(f.severity.value, f.subject, f.check) for f in diagnose(inp) if f.check.startswith("link")]


def test_a_link_the_underlay_carries_whole_has_nothing_to_say():
    assert link_found(linked()) == []
    assert link_found(linked(peer_node="pve1", underlay=(None, None), mtu=9000)) == []  # loopback: any size
    assert link_found(linked(underlay=("eno1", 9000), mtu=8958)) == []


def test_a_link_whose_guest_mtu_the_underlay_cannot_carry_is_a_warning_with_the_mtu_that_fits():
    [finding] = [f for f in diagnose(linked(mtu=1500)) if f.check == "link-underlay-mtu"]
    assert finding.severity is Severity.WARNING and finding.subject == "VM 100 net2"
    assert str(finding) == (
        "warning: VM 100 net2: the link to 101:net3 has guest MTU 1500, which needs an underlay MTU of 1542 "
        "(IPv4: 42 bytes of tunnel), but eno1 has 1500: larger frames are fragmented (slow); raise eno1's MTU "
        "to 1542, or re-add the link with --mtu 1458")
    ipv6 = linked(addresses={"pve1": "2001:db8::11", "pve2": "2001:db8::12"})
    assert link_found(ipv6) == [("warning", "VM 100 net2", "link-underlay-mtu")]  # 1458 + 62 > 1500


@pytest.mark.parametrize("inp, expected, words", [
    (linked(underlay=(None, None)), ("error", "VM 100 net2", "link-address"),
     "no interface of this node has its cluster address 192.0.2.11"),
    (linked(peer_node=None), ("error", "VM 100 net2", "link-dark"), "is dark: VM 101 has no config on any node"),
    (linked(addresses={"pve1": "192.0.2.11"}), ("error", "VM 100 net2", "link-dark"),
     "node pve2 has no ring0_addr in corosync.conf"),
    (linked(peer_declared=False), ("error", "links", "link-one-sided"), "101:net3, which declares no link end"),
    (linked(links=None, links_problem="cannot read this node's addresses through netlink: denied"),
     ("warning", "links", "links-unreadable"), "not checked: cannot read this node's addresses"),
])
def test_a_link_that_cannot_reach_its_peer_is_named(inp, expected, words):
    findings = [f for f in diagnose(inp) if f.check.startswith("link")]
    assert [(f.severity.value, f.subject, f.check) for f in findings] == [expected]
    assert words in findings[0].problem and findings[0].fix


def test_declarations_of_a_gone_vm_name_its_link_ends_too():
    inp = dataclasses.replace(linked(), cluster_vmids=frozenset({100}))
    [gone] = [f for f in diagnose(inp) if f.check == "spec-without-vm"]
    assert "101.cfg declares net3, but no node has a VM 101" in gone.problem
