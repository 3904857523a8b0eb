"""/etc/network/interfaces as ifupdown2 reads it (formats/interfaces.py), and dpkg's status file."""

import pytest

from builders import SEED_INTERFACES
from pve_vhost_agent.formats.dpkgstatus import installed_packages
from pve_vhost_agent.formats.interfaces import combine, parse_file, parse_vids

# The seed host (tests/builders.py), with what else ifupdown2 reads: `vlanN` with
# vlan-raw-device, and an inet6 stanza that merges into the inet one.
SEED = SEED_INTERFACES + """
auto vlan60
iface vlan60 inet manual
\tvlan-raw-device bond0

iface vmbr1 inet6 static
\taddress fd00::1/64
\tmtu 1400
"""


def network(text=SEED, path="/etc/network/interfaces"):
    return combine([parse_file(text, path)])


def test_the_seed_host_reads_as_ifupdown2_reads_it():
    nf = network()
    assert [s.name for s in nf.stanzas] == ["lo", "eno1", "eno2", "bond0", "vmbr0", "vmbr0.50", "vmbr1", "vlan60"]
    bond = nf.stanza("bond0")
    assert (bond.auto, bond.is_bond, bond.bond_slaves, bond.bond_mode, bond.bond_miimon, bond.mtu) == \
        (True, True, ("eno1", "eno2"), "802.3ad", 100, 9000)
    assert bond.bond_xmit_hash_policy == "layer3+4"
    bridge = nf.stanza("vmbr0")
    assert (bridge.is_bridge, bridge.bridge_ports, bridge.bridge_vlan_aware, bridge.bridge_stp, bridge.bridge_fd) == \
        (True, ("bond0",), True, False, 0.0)
    assert bridge.bridge_vids == tuple(range(2, 4095))
    assert bridge.where == "/etc/network/interfaces:17"
    assert (nf.stanza("vmbr0.50").vlan_raw_device, nf.stanza("vmbr0.50").vlan_id) == ("vmbr0", 50)
    assert (nf.stanza("vlan60").vlan_raw_device, nf.stanza("vlan60").vlan_id) == ("bond0", 60)
    assert not nf.stanza("eno1").auto and nf.depended_on() >= {"eno1", "eno2", "bond0"}
    nat = nf.stanza("vmbr1")  # inet and inet6 stanzas merge
    assert (nat.bridge_ports, nat.mtu, len(nat.post_up)) == ((), 1400, 2)
    assert nf.problems == ()


def test_option_names_take_underscores_as_dashes():
    stanza = network("iface bond1 inet manual\n bond_slaves eno3\n bond_xmit_hash_policy layer2+3\n").stanza("bond1")
    assert (stanza.bond_slaves, stanza.bond_xmit_hash_policy) == (("eno3",), "layer2+3")


def test_sources_are_handed_to_the_adapter_in_order():
    parsed = parse_file("source-directory /etc/network/interfaces.d\nsource ../more.cfg\n", "/etc/network/interfaces")
    assert [(s.kind, s.pattern, s.where) for s in parsed.sources] == [
        ("source-directory", "/etc/network/interfaces.d", "/etc/network/interfaces:1"),
        ("source", "../more.cfg", "/etc/network/interfaces:2")]


def test_later_files_override_single_values_and_add_commands():
    main = parse_file("auto vmbr0\niface vmbr0 inet manual\n\tmtu 1500\n\tpost-up true\n", "/a")
    sourced = parse_file("iface vmbr0 inet manual\n\tmtu 9000\n\tup echo\n", "/b")
    stanza = combine([main, sourced]).stanza("vmbr0")
    assert (stanza.mtu, stanza.post_up, stanza.auto, stanza.where) == (9000, ("true", "echo"), True, "/a:2")


def test_continuation_lines_comments_and_allow_auto():
    nf = network("allow-auto bond1\niface bond1 inet manual\n  bond-slaves eno3 \\\n   eno4\n# mtu 1\n  bond-mode 1\n")
    bond = nf.stanza("bond1")
    assert (bond.auto, bond.bond_slaves, bond.bond_mode, bond.mtu) == (True, ("eno3", "eno4"), "active-backup", None)


PROBLEMS = [
    ("iface x inet manual\n mtu nine\n", "/i:2: iface x: mtu 'nine': not a whole number"),
    ("iface x inet manual\n bond-mode lacp\n", "/i:2: iface x: bond-mode 'lacp': not a bonding mode"),
    ("iface x inet manual\n bridge-vids 1-5000\n", "/i:2: iface x: bridge-vids '1-5000': '1-5000' is outside 1-4094"),
    ("iface x inet manual\n bridge-vlan-aware maybe\n", "/i:2: iface x: bridge-vlan-aware 'maybe': not yes or no"),
    ("  mtu 9000\n", "/i:1: `mtu` is outside any iface stanza"),
    ("iface x inet manual\n mtu\n", "/i:2: iface x: `mtu` has no value"),
]


@pytest.mark.parametrize("text, problem", PROBLEMS)
def test_lines_ifupdown2_would_complain_about_are_named_with_file_and_line(text, problem):
    assert network(text, "/i").problems == (problem,)


@pytest.mark.parametrize("text, vids", [
    ("2-4094", tuple(range(2, 4095))), ("10 20 30-32", (10, 20, 30, 31, 32)), ("10,20", (10, 20)), ("7", (7,)),
])
def test_bridge_vids_lists(text, vids):
    assert parse_vids(text) == vids


def test_open_vswitch_stanzas_are_not_kernel_bonds_or_vlans():
    nf = network("auto vmbr9\niface vmbr9 inet manual\n ovs_type OVSBridge\n ovs_ports bond9\n"
                 "auto bond9\niface bond9 inet manual\n ovs_type OVSBond\n ovs_bonds eno5 eno6\n"
                 "auto vmbr9.5\niface vmbr9.5 inet manual\n ovs_type OVSIntPort\n")
    assert [(s.name, s.ovs_type, s.is_bond, s.is_bridge, s.is_vlan) for s in nf.stanzas] == [
        ("vmbr9", "OVSBridge", False, False, False), ("bond9", "OVSBond", False, False, False),
        ("vmbr9.5", "OVSIntPort", False, False, False)]


def test_dpkg_status_lists_only_installed_packages():
    text = ("Package: librte-mempool-ring23\nStatus: install ok installed\nVersion: 22.11\n\n"
            "Package: dpdk\nStatus: deinstall ok config-files\n\n"
            "Package: openvswitch-switch-dpdk\nStatus: hold ok installed\n")
    assert installed_packages(text) == {"librte-mempool-ring23", "openvswitch-switch-dpdk"}
