"""`adopt` as tables: a hand-written args line (the TNSR recipe and its variants) in, the
declarations, the line without the adopted words and the notes out, or the refusals."""

import pytest

from builders import vm_config
from pve_vhost_agent.model.spec import Backend, ClusterSpec, TapQinQ, QinQ, VhostNic
from pve_vhost_agent.plan.adopt import plan_adopt

VM = "balloon: 0\nmemory: 4096\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n"
# The TNSR recipe's own line: VPP/TNSR serves the socket, QEMU connects and retries.
RECIPE = ("-chardev socket,id=char1,path=/var/run/vpp/vm-100-0.sock,reconnect=2 "
          "-netdev type=vhost-user,id=vm-100-0,chardev=char1,vhostforce=on "
          "-object memory-backend-file,id=mem1000,size=4096M,mem-path=/dev/shm,share=on "
          "-numa node,memdev=mem1000")
DEVICE = "-device virtio-net-pci,netdev=vm-100-0,mac=02:AA:BB:CC:DD:01,rx_queue_size=1024,tx_queue_size=1024"
RANDOM_MACS = ["02:00:00:00:00:F0", "02:00:00:00:00:F1"]  # what the flow's random source would give


def adopt(args, body=VM, cluster=ClusterSpec(), patched=False, **keys):
    config = vm_config(body, **({"args": args} if args else {}), **keys)
    return plan_adopt(100, config, cluster, "vhostbr0", iter(RANDOM_MACS), patched)


def test_the_recipe_becomes_an_external_nic_on_its_own_socket_and_the_agents_memory():
    plan = adopt(RECIPE + " " + DEVICE + " -smbios type=1")
    assert plan.refusals == ()
    assert plan.nics == (VhostNic(100, 1, "vhostbr0", "02:AA:BB:CC:DD:01", backend=Backend.EXTERNAL,
                                  socket="/var/run/vpp/vm-100-0.sock"),)  # the MAC the guest knows is kept
    assert plan.user_args == "-smbios type=1"  # the user's other words stay, in order
    assert any("/dev/shm" in n and "resize is no longer needed" in n for n in plan.notes)


def test_the_recipe_without_a_device_word_gets_a_new_mac():
    plan = adopt(RECIPE)
    assert [(n.index, n.mac, n.socket) for n in plan.nics] == [(1, "02:00:00:00:00:F0", "/var/run/vpp/vm-100-0.sock")]
    assert plan.user_args is None


def test_several_nics_keep_their_slots_queues_and_sizes():
    line = (RECIPE + " " + DEVICE.replace("rx_queue_size=1024", "rx_queue_size=512,bus=pci.0,addr=0x14")
            + " -chardev socket,id=char2,path=/run/x/vm-100-1.sock,server=on,wait=off"
            + " -netdev type=vhost-user,id=n2,chardev=char2,vhostforce=on,queues=4"
            + " -device virtio-net-pci,netdev=n2,mac=02:AA:BB:CC:DD:02,mq=on,vectors=10,host_mtu=9000")
    plan = adopt(line)
    assert plan.refusals == ()
    first, second = plan.nics
    assert (first.index, first.rx_queue_size, first.backend) == (2, 512, Backend.EXTERNAL)  # pci.0 0x14 is net2's slot
    assert (second.index, second.queues, second.mtu, second.backend, second.socket) == (1, 4, 9000, Backend.OVS, None)
    assert any("moves from /run/x/vm-100-1.sock into the agent's folder" in n for n in plan.notes)


REFUSED = [
    ("a memory size that is not the VM's", RECIPE.replace("size=4096M", "size=2048M"), "size=2048M, but the VM has memory: 4096"),
    ("a second memory backend", RECIPE + " -object memory-backend-ram,id=m2,size=1G", "2 memory backends"),
    ("an unknown chardev option", RECIPE.replace("reconnect=2", "reconnect=2,logfile=/tmp/x"), "option `logfile`"),
    ("a netdev without its chardev", "-netdev type=vhost-user,id=n,chardev=nope", "no -chardev with id=nope"),
    ("a line Proxmox would drop", RECIPE + " 'unbalanced", "unbalanced quote"),
    ("nothing to adopt", "-smbios type=1", "no hand-written vhost-user NIC"),
]


@pytest.mark.parametrize("what, line, words", REFUSED, ids=[r[0] for r in REFUSED])
def test_what_cannot_be_mapped_is_refused_item_by_item(what, line, words):
    plan = adopt(line)
    assert plan.refusals and any(words in r for r in plan.refusals), plan.refusals
    assert all("\n" not in r for r in plan.refusals)


def test_a_patched_network_pm_nic_becomes_tap_qinq_only_when_asked():
    net1 = "virtio=BC:24:11:00:00:02,bridge=vmbr1,tag=950,trunks=10;20-22"
    assert adopt("", net1=net1).refusals  # without --patched-qinq: nothing to adopt
    plan = adopt("", patched=True, net1=net1)
    assert plan.refusals == () and plan.nics == ()
    assert plan.tap_qinq == (TapQinQ(100, 1, QinQ(950, (10, 20, 21, 22))),)
    assert plan.net_values == {"net1": "virtio=BC:24:11:00:00:02,bridge=vmbr1,tag=950"}
    firewalled = adopt("", patched=True, net1=net1 + ",firewall=1")
    assert any("firewall=1" in r for r in firewalled.refusals)


def test_an_index_the_vm_or_the_spec_holds_is_never_taken():
    held = ClusterSpec((VhostNic(100, 1, "vhostbr0", "02:00:00:00:00:01"),))
    plan = adopt(RECIPE, cluster=held)
    assert [n.index for n in plan.nics] == [2]
