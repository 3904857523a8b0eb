"""Reading a VM config the way qemu-server does: NICs, memory layout, machine family."""

import pytest

from pve_vhost_agent.errors import ConfigConflict
from pve_vhost_agent.formats.vmlayout import machine_type, memory_layout, net_devices, parse_property_string

from conftest import PEER


def test_net_lines_old_and_new_spelling():
    nets = net_devices({
        "net0": "virtio=A2:C0:43:77:08:A0,bridge=vmbr0,mtu=900",
        "net3": "model=e1000,macaddr=bc:24:11:00:00:01,bridge=vmbr1,tag=5,trunks=10;20-30,firewall=1",
        "netmask": "ignored",
    })
    assert list(nets) == [0, 3]
    assert nets[0].model == "virtio" and nets[0].mac == "A2:C0:43:77:08:A0" and nets[0].bridge == "vmbr0"
    assert nets[3].tag == 5 and nets[3].trunks == "10;20-30" and nets[3].firewall
    assert nets[3].mac == "BC:24:11:00:00:01"


@pytest.mark.parametrize(
    "config, expected",
    [
        ({}, dict(memory_mib=512, numa=False, hugepages=None, memory_hotplug=False, balloon=True)),
        ({"memory": "current=4096", "balloon": "0"}, dict(memory_mib=4096, balloon=False)),
        ({"memory": "2048", "numa": "1", "hugepages": "2"}, dict(numa=True, hugepages="2")),
        ({"hotplug": "disk,network,usb,memory"}, dict(memory_hotplug=True)),
        ({"hotplug": "1"}, dict(memory_hotplug=False)),
        ({"virtiofs0": "share1"}, dict(virtiofs=True)),
    ],
)
def test_memory_layout(config, expected):
    layout = memory_layout(config)
    for key, value in expected.items():
        assert getattr(layout, key) == value, key


def test_proxmox_shares_memory_only_with_hugepages_numa_or_virtiofs():
    assert memory_layout({"numa": "1", "hugepages": "1024"}).proxmox_shares_memory
    assert memory_layout({"virtiofs0": "x"}).proxmox_shares_memory
    assert not memory_layout({"numa": "1"}).proxmox_shares_memory
    assert not memory_layout({}).proxmox_shares_memory


def test_bad_memory_value_names_the_fix():
    with pytest.raises(ConfigConflict, match="qm set <vmid> --memory"):
        memory_layout({"memory": "lots"})


@pytest.mark.peer
def test_memory_matches_proxmox_command_lines():
    # The peer corpus shows the -m Proxmox generated for each config.
    checked = 0
    for conf in sorted((PEER / "qemu-server-cfg2cmd").glob("*.conf")):
        cmd = conf.with_name(conf.name + ".cmd")
        if not cmd.exists():
            continue
        lines = [l.strip() for l in conf.read_text().splitlines() if ":" in l and not l.startswith(("#", "["))]
        config = dict(l.split(": ", 1) for l in lines if ": " in l)
        m_arg = [l for l in cmd.read_text().splitlines() if l.strip().startswith("-m ")]
        # With memory hotplug -m holds only the static part; a template starts (for a
        # backup) with a fixed 512 MiB.
        if not m_arg or "hotplug" in config or config.get("template") == "1":
            continue
        expected = m_arg[0].split()[1].strip("'").split(",")[0].removeprefix("size=")
        assert memory_layout(config).memory_mib == int(expected), conf.name
        checked += 1
    assert checked > 50


def test_machine_family():
    assert machine_type({"machine": "q35"}) == "q35"
    assert machine_type({"machine": "pc-q35-8.1+pve0"}) == "q35"
    assert machine_type({"machine": "type=q35,viommu=intel"}) == "q35"
    assert machine_type({"machine": "pc-i440fx-5.0"}) == "pc"
    assert machine_type({}) == "pc"
    assert parse_property_string("4096", "current") == {"current": "4096"}


@pytest.mark.parametrize("value, items", [
    (None, []), ("1", ["network", "disk", "usb"]), ("0", []), ("disk, memory", ["disk", "memory"]), ("", []),
])
def test_hotplug_items_as_qemu_server_reads_them(value, items):
    from pve_vhost_agent.formats.vmlayout import hotplug_items
    assert hotplug_items({} if value is None else {"hotplug": value}) == items
