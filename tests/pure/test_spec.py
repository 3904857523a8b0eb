"""The spec model refuses what would break QEMU's option strings or OVS, with one clear line."""

import pytest

from pve_vhost_agent.errors import ExitCode, SpecError
from pve_vhost_agent.model.spec import (
    ClusterSpec, EtherType, QinQ, TapQinQ, VhostNic, VlanPolicy, check_mac, random_mac, unused_mac,
    format_vlan_list, parse_nic_name, parse_vlan_list,
)

MAC = "02:00:00:00:01:01"


def nic(**kw):
    base = dict(vmid=100, index=1, bridge="br-vhost", mac=MAC)
    base.update(kw)
    return VhostNic(**base)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"bridge": "vmbr0,id=x"}, "not a valid interface name"),
        ({"bridge": "br 0"}, "not a valid interface name"),
        ({"bridge": 'br"0'}, "not a valid interface name"),
        ({"bridge": "br0\n"}, "not a valid interface name"),
        ({"bridge": "a-bridge-name-too-long"}, "not a valid interface name"),
        ({"mac": "01:00:5E:00:00:01"}, "multicast"),
        ({"mac": "00:00:00:00:00:00"}, "all zeros"),
        ({"mac": "02:00:00:00:01:01,x=1"}, "malformed"),
        ({"index": 32}, "outside 0-31"),
        ({"vmid": 0}, "not a positive integer"),
        ({"queues": 0}, "queues 0"),
        ({"queues": 65}, "queues 65"),
        ({"rx_queue_size": 2048}, "rx queue size"),
        ({"mtu": 9711}, "MTU 9711"),
    ],
)
def test_bad_nic_values_are_refused_with_one_line(kwargs, words):
    with pytest.raises(SpecError) as info:
        nic(**kwargs)
    message = str(info.value)
    assert words in message
    assert "\n" not in message and ";" in message  # problem; fix
    assert info.value.exit_code == ExitCode.BAD_SPEC


@pytest.mark.parametrize(
    "kwargs, words",
    [({"tag": 4095}, "VLAN tag 4095 is outside 1-4094"), ({"trunks": (0,)}, "trunk VLAN 0")],
)
def test_bad_vlans_are_refused(kwargs, words):
    with pytest.raises(SpecError, match=words):
        VlanPolicy(**kwargs)


def test_only_one_vlan_mode():
    with pytest.raises(SpecError, match="only one VLAN mode"):
        VlanPolicy(tag=10, qinq=QinQ(950))


def test_qinq_checks_stag_and_cvlans():
    with pytest.raises(SpecError, match="S-tag 5000"):
        QinQ(5000)
    with pytest.raises(SpecError, match="customer VLAN 4095"):
        QinQ(950, cvlans=(10, 4095))
    assert VlanPolicy(qinq=QinQ(950, (10,), EtherType.DOT1Q)).mode == "dot1q-tunnel"
    assert VlanPolicy(tag=10).mode == "access"
    assert VlanPolicy(trunks=(10, 11)).mode == "trunk"
    assert VlanPolicy().mode == ""


def test_mac_is_normalised_to_proxmox_upper_case():
    assert nic(mac="02:aa:bb:cc:dd:ee").mac == "02:AA:BB:CC:DD:EE"
    assert check_mac("bc:24:11:00:00:01") == "BC:24:11:00:00:01"


def test_random_macs_are_local_unicast_or_carry_the_clusters_prefix():
    mac = random_mac(bytes([0xFF, 1, 2, 3, 4, 5]))
    assert mac == "FE:01:02:03:04:05"  # multicast bit cleared, locally administered bit set
    octet = int(random_mac(bytes(6))[:2], 16)
    assert octet & 0x02 and not octet & 0x01
    assert random_mac(bytes([0xFF, 1, 2, 3, 4, 5]), "bc:24:11") == "BC:24:11:03:04:05"  # as Proxmox does
    with pytest.raises(SpecError, match="mac_prefix '01:00' in datacenter.cfg is not a unicast MAC prefix"):
        random_mac(bytes(6), "01:00")


def test_an_unused_mac_is_never_one_the_cluster_or_the_vm_has():
    assert unused_mac(iter(["02:00:00:00:00:01", "02:00:00:00:00:02"]), ["02:00:00:00:00:01"]) == "02:00:00:00:00:02"
    with pytest.raises(SpecError, match="no unused MAC in 64 random tries; give one with --mac"):
        unused_mac(iter(lambda: "02:00:00:00:00:01", None), ["02:00:00:00:00:01"])


def test_vlan_lists_parse_both_separators_and_compact():
    assert parse_vlan_list("10;20-22,5") == (5, 10, 20, 21, 22)
    assert format_vlan_list((5, 10, 20, 21, 22)) == "5,10,20-22"
    for bad in ("", "10,,11", "a", "10-5", "0", "4095", "1-2-3"):
        with pytest.raises(SpecError):
            parse_vlan_list(bad)


def test_nic_names():
    assert parse_nic_name("net31") == 31
    for bad in ("net32", "eth0", "net-1", "net01x"):
        with pytest.raises(SpecError, match="net0 .. net31"):
            parse_nic_name(bad)


def test_cluster_spec_refuses_duplicates_and_orders_entries():
    a = nic(vmid=101, index=2, mac="02:00:00:00:00:02")
    b = nic(vmid=100, index=3, mac="02:00:00:00:00:03")
    spec = ClusterSpec((a, b), (TapQinQ(100, 0, QinQ(950)),))
    assert [n.key for n in spec.nics] == [(100, 3), (101, 2)]
    assert spec.vmids() == [100, 101]
    assert spec.for_vm(100).nics == (b,) and spec.for_vm(100).tap_qinq
    with pytest.raises(SpecError, match="declared twice"):
        ClusterSpec((b,), (TapQinQ(100, 3, QinQ(950)),))
    with pytest.raises(SpecError, match="already used by VM 101 net2"):
        ClusterSpec((a, nic(vmid=102, index=1, mac="02:00:00:00:00:02")))
    replaced = spec.with_entry(nic(vmid=100, index=3, mac=MAC, queues=4))
    assert replaced.entry(100, 3).queues == 4 and len(replaced.nics) == 2
    assert spec.without(100, 0).tap_qinq == ()
