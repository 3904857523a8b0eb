"""The args planner: spec + effective VM config + QEMU version -> the agent's exact args."""

from pathlib import Path

import pytest

from pve_vhost_agent.plan.args import ArgsPlan, nic_pci_slot, plan_args
from pve_vhost_agent.errors import ConfigConflict, MemoryLayoutError, SpecError
from pve_vhost_agent.formats.qemuargs import agent_args, merge_agent_args
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import Backend, QinQ, TapQinQ, VhostNic, VmSpec

DIRS = {backend: Settings(node="n1").socket_dir(backend.value) for backend in Backend}
OVS_SOCK = "/run/pve-vhost-agent/ovs"
EXT_SOCK = "/run/pve-vhost-agent/external"
MAC1, MAC2 = "02:00:00:00:01:01", "02:00:00:00:01:02"
QEMU_9_1, QEMU_9_2, QEMU_10 = (9, 1, 0), (9, 2, 0), (10, 0, 2)
PLAIN_VM = {"memory": "4096", "balloon": "0", "cores": "2", "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"}
MEMFD_4096 = ("-object", "memory-backend-memfd,id=vhu-mem,size=4096M,share=on", "-machine", "memory-backend=vhu-mem")


def nic(index, backend=Backend.OVS, mac=MAC1, **kw):
    return VhostNic(vmid=100, index=index, bridge="vhubr0", mac=mac, backend=backend, **kw)


def vm(*nics):
    return VmSpec(100, tuple(nics))


def plan(spec, config=PLAIN_VM, version=QEMU_10):
    return plan_args(spec, config, version, DIRS)


def nic_args(index, chardev_tail, device_tail="", netdev_tail="", mac=MAC1, rx=1024):
    bus, slot = nic_pci_slot(index)
    sock = EXT_SOCK if "reconnect" in chardev_tail else OVS_SOCK
    return (
        "-chardev", f"socket,id=vhu-net{index},path={sock}/vm-100-{index}.sock,{chardev_tail}",
        "-netdev", f"type=vhost-user,id=vhu-net{index},chardev=vhu-net{index},vhostforce=on{netdev_tail}",
        "-device", f"virtio-net-pci,id=vhu-net{index},netdev=vhu-net{index},mac={mac},bus={bus},addr=0x{slot:x},"
                   f"rx_queue_size={rx},tx_queue_size=1024{device_tail}",
    )


SERVER = "server=on,wait=off"


@pytest.mark.parametrize("spec, config, version, expected", [
    # numa off: the agent's memfd backend, sized from `memory`, then the NIC.
    (vm(nic(1)), PLAIN_VM, QEMU_10, MEMFD_4096 + nic_args(1, SERVER)),
    # backend external: QEMU is the client; reconnect by QEMU version.
    (vm(nic(1, Backend.EXTERNAL)), PLAIN_VM, QEMU_9_1, MEMFD_4096 + nic_args(1, "reconnect=1")),
    (vm(nic(1, Backend.EXTERNAL)), PLAIN_VM, (9, 1, 99), MEMFD_4096 + nic_args(1, "reconnect=1")),
    (vm(nic(1, Backend.EXTERNAL)), PLAIN_VM, QEMU_9_2, MEMFD_4096 + nic_args(1, "reconnect-ms=1000")),
    (vm(nic(1, Backend.EXTERNAL)), PLAIN_VM, QEMU_10, MEMFD_4096 + nic_args(1, "reconnect-ms=1000")),
    # multiqueue and MTU
    (vm(nic(2, queues=4)), PLAIN_VM, QEMU_10,
     MEMFD_4096 + nic_args(2, SERVER, ",mq=on,vectors=10", ",queues=4")),
    (vm(nic(3, mtu=9000)), PLAIN_VM, QEMU_10, MEMFD_4096 + nic_args(3, SERVER, ",host_mtu=9000")),
    (vm(nic(4, queues=2, mtu=1500, rx_queue_size=256)), PLAIN_VM, QEMU_10,
     MEMFD_4096 + nic_args(4, SERVER, ",mq=on,vectors=6,host_mtu=1500", ",queues=2", rx=256)),
    # PCI slots: net1-5 on pci.0 0x13-0x17, net6-31 on pci.1 0x1-0x1a; the order is by index.
    (vm(nic(31, mac=MAC2), nic(5), nic(6, Backend.EXTERNAL, mac="02:00:00:00:01:03")), PLAIN_VM, QEMU_10,
     MEMFD_4096 + nic_args(5, SERVER) + nic_args(6, "reconnect-ms=1000", mac="02:00:00:00:01:03")
     + nic_args(31, SERVER, mac=MAC2)),
    # q35 uses the same bus names (its -readconfig file defines pci.0-pci.3).
    (vm(nic(7)), {**PLAIN_VM, "machine": "q35"}, QEMU_10, MEMFD_4096 + nic_args(7, SERVER)),
    # pending memory is already in the effective config the caller passes; default 512.
    (vm(nic(1)), {**PLAIN_VM, "memory": "current=8192"}, QEMU_10,
     ("-object", "memory-backend-memfd,id=vhu-mem,size=8192M,share=on", "-machine", "memory-backend=vhu-mem")
     + nic_args(1, SERVER)),
    (vm(nic(1)), {"balloon": "0"}, QEMU_10,
     ("-object", "memory-backend-memfd,id=vhu-mem,size=512M,share=on", "-machine", "memory-backend=vhu-mem")
     + nic_args(1, SERVER)),
    # Proxmox already shares memory: numa + hugepages, or virtiofs (with or without numa).
    (vm(nic(1)), {**PLAIN_VM, "numa": "1", "hugepages": "2"}, QEMU_10, nic_args(1, SERVER)),
    (vm(nic(1)), {**PLAIN_VM, "numa": "1", "hugepages": "1024"}, QEMU_10, nic_args(1, SERVER)),
    (vm(nic(1)), {**PLAIN_VM, "virtiofs0": "share1"}, QEMU_10, nic_args(1, SERVER)),
    (vm(nic(1)), {**PLAIN_VM, "numa": "1", "virtiofs0": "share1"}, QEMU_10, nic_args(1, SERVER)),
    # hotplug without memory is fine
    (vm(nic(1)), {**PLAIN_VM, "hotplug": "1"}, QEMU_10, MEMFD_4096 + nic_args(1, SERVER)),
    (vm(nic(1)), {**PLAIN_VM, "hotplug": "network,disk"}, QEMU_10, MEMFD_4096 + nic_args(1, SERVER)),
])
def test_planned_args(spec, config, version, expected):
    assert plan(spec, config, version).args == expected


def test_socket_folders_follow_the_settings_root(tmp_path):
    dirs = {b: Settings(root=tmp_path, node="n1").socket_dir(b.value) for b in Backend}
    result = plan_args(vm(nic(1), nic(2, Backend.EXTERNAL, mac=MAC2)), PLAIN_VM, QEMU_10, dirs)
    assert f"path={tmp_path}/run/pve-vhost-agent/ovs/vm-100-1.sock," in result.args[5]
    assert f"path={tmp_path}/run/pve-vhost-agent/external/vm-100-2.sock," in result.args[11]


def test_notes_say_why_each_part_is_there():
    notes = plan(vm(nic(1), nic(8, Backend.EXTERNAL, mac=MAC2, queues=2, mtu=9000)), version=QEMU_9_1).notes
    assert notes[0].startswith("memory: memfd backend of 4096 MiB shared with the vhost-user backend, because numa is off")
    text = "\n".join(notes)
    assert "net1: socket /run/pve-vhost-agent/ovs/vm-100-1.sock; QEMU listens and OVS-DPDK connects" in text
    assert "net8: socket /run/pve-vhost-agent/external/vm-100-8.sock; QEMU connects" in text
    assert "reconnect, QEMU 9.1.0 < 9.2" in text
    assert "net8: virtio-net-pci with MAC 02:00:00:00:01:02 at pci.1 addr 0x3, the slot Proxmox reserves for net8" in text
    assert "net8: 2 queue pairs" in text and "net8: MTU 9000" in text
    hugepages = plan(vm(nic(1)), {**PLAIN_VM, "numa": "1", "hugepages": "2"}).notes
    assert hugepages[0] == ("memory: nothing added; Proxmox's hugepages backend (numa: 1, hugepages: 2) "
                            "already shares guest memory")


def test_no_vhost_nics_plan_no_args_whatever_the_memory_layout():
    tap_only = VmSpec(100, (), (TapQinQ(100, 0, QinQ(100)),))
    for config in (PLAIN_VM, {"numa": "1"}, {"hotplug": "memory"}, {}):
        assert plan_args(tap_only, config, QEMU_10, DIRS).args == ()
        assert plan_args(VmSpec(100), config, QEMU_10, DIRS) == plan_args(tap_only, config, QEMU_10, DIRS)


def test_a_template_gets_no_args():
    # qemu-server starts templates (backup only) from a minimal config that has no args.
    result = plan(vm(nic(1)), {**PLAIN_VM, "template": "1", "numa": "1"})
    assert result.args == () and "template" in result.notes[0]


def test_plan_is_deterministic_and_ignores_spec_order():
    one = plan_args(vm(nic(9, mac=MAC2), nic(1)), PLAIN_VM, QEMU_10, DIRS)
    two = plan_args(vm(nic(1), nic(9, mac=MAC2)), dict(reversed(list(PLAIN_VM.items()))), QEMU_10, DIRS)
    assert one == two and isinstance(one, ArgsPlan)
    assert plan(vm(nic(1))) == plan(vm(nic(1)))


@pytest.mark.parametrize("config, reason, fix", [
    ({**PLAIN_VM, "numa": "1", "hotplug": "network,memory"}, "VM 100 has memory hotplug on",
     "qm set 100 --hotplug network"),
    ({**PLAIN_VM, "numa": "1", "hotplug": "memory", "hugepages": "2"}, "memory hotplug", "--hotplug 0"),
    ({**PLAIN_VM, "numa": "1"}, "numa on without hugepages", "qm set 100 --hugepages 2"),
    ({**PLAIN_VM, "hugepages": "2"}, "hugepages: 2 but numa is off", "qm set 100 --numa 1"),
    ({k: v for k, v in PLAIN_VM.items() if k != "balloon"}, "ballooning on", "set `balloon: 0`: qm set 100 --balloon 0"),
    ({**PLAIN_VM, "balloon": "2048"}, "ballooning on", "qm set 100 --balloon 0"),
    ({**PLAIN_VM, "balloon": "2048", "numa": "1", "hugepages": "2"}, "ballooning on", "--balloon 0"),
])
def test_unsafe_memory_layouts_are_refused_with_the_fix(config, reason, fix):
    with pytest.raises(MemoryLayoutError) as err:
        plan(vm(nic(1)), config)
    message = str(err.value)
    assert reason in message and fix in message and "\n" not in message


def test_a_nic_index_used_by_a_proxmox_nic_is_a_conflict():
    with pytest.raises(ConfigConflict, match=r"net0 of VM 100 is both a Proxmox NIC .* \(qm set 100 --delete net0\)"):
        plan(vm(nic(0)))


def test_a_mac_used_by_a_proxmox_nic_of_the_vm_is_a_conflict():
    with pytest.raises(ConfigConflict, match="MAC BC:24:11:00:00:01 of vhost-user net1 is also the MAC of Proxmox NIC net0"):
        plan(vm(nic(1, mac="bc:24:11:00:00:01")))


def test_user_args_that_clash_are_refused():
    config = {**PLAIN_VM, "args": "-cpu host -numa node,nodeid=0"}
    with pytest.raises(ConfigConflict, match="`-numa node,nodeid=0`"):
        plan(vm(nic(1)), config)
    config = {**PLAIN_VM, "args": "-device e1000,id=x,bus=pci.1,addr=0x2"}
    with pytest.raises(ConfigConflict, match="pci.1 slot 0x2, the slot of the agent's vhu-net7"):
        plan(vm(nic(7)), config)


def test_the_agents_own_old_args_and_harmless_user_args_are_fine():
    old = merge_agent_args("-cpu host", plan(vm(nic(3))).args)
    config = {**PLAIN_VM, "args": old}
    result = plan(vm(nic(1, Backend.EXTERNAL)), config)
    merged = merge_agent_args(old, result.args)
    assert merged.startswith("-cpu host -object") and agent_args(merged) == result.args


@pytest.mark.parametrize("root", ["/tmp/a b", "/tmp/a,b", "/tmp/a'b", "/tmp/a=b"])
def test_socket_paths_that_would_need_quoting_are_refused(root):
    dirs = {b: Settings(root=Path(root), node="n1").socket_dir(b.value) for b in Backend}
    with pytest.raises(SpecError, match="socket path"):
        plan_args(vm(nic(1)), PLAIN_VM, QEMU_10, dirs)


def test_a_socket_path_too_long_for_unix_sockets_is_refused():
    dirs = {b: Path("/" + "d" * 90) / b.value for b in Backend}
    with pytest.raises(SpecError, match="longer than 107 bytes"):
        plan_args(vm(nic(1)), PLAIN_VM, QEMU_10, dirs)


def test_a_nic_of_another_vm_or_twice_the_same_index_is_refused():
    with pytest.raises(SpecError):
        plan_args(VmSpec(101, (nic(1),)), PLAIN_VM, QEMU_10, DIRS)
    with pytest.raises(SpecError, match="declared twice"):
        plan(vm(nic(1), nic(1, mac=MAC2)))


@pytest.mark.parametrize("index, slot", [(0, ("pci.0", 0x12)), (5, ("pci.0", 0x17)), (6, ("pci.1", 0x1)),
                                         (31, ("pci.1", 0x1a))])
def test_pci_slots_are_the_ones_proxmox_reserves(index, slot):
    assert nic_pci_slot(index) == slot
