"""Which config a start uses, which NICs it serves, and the args check's refusals (tables)."""

import pytest

from pve_vhost_agent.errors import StaleArgs
from pve_vhost_agent.model.ovs import OvsInterface, OvsPort, OvsState
from pve_vhost_agent.plan.ports import port_problems
from pve_vhost_agent.model.spec import Backend, VhostNic, VmSpec
from pve_vhost_agent.plan.start import served_spec, stale_args, start_config
from pve_vhost_agent.formats.vmconfig import VmConfig

SOCK = "/run/pve-vhost-agent/ovs"


def nic_args(vmid, *indices):
    words = []
    for i in indices:
        words += ["-chardev", f"socket,id=vhu-net{i},path={SOCK}/vm-{vmid}-{i}.sock,server=on,wait=off",
                  "-netdev", f"type=vhost-user,id=vhu-net{i},chardev=vhu-net{i},vhostforce=on"]
    return words


def nic(index, vmid=100):
    return VhostNic(vmid, index, "br0", f"02:00:00:00:00:{index:02X}")


CONFIG = VmConfig.parse(
    f"memory: 128\nargs: {' '.join(nic_args(100, 1, 2))}\n\n[PENDING]\nmemory: 192\nargs: {' '.join(nic_args(100, 1))}\n")


@pytest.mark.parametrize(
    "extra, migrated_from, memory, resumes",
    [
        ("", None, "192", ""),
        ("", "nodeB", "128", "a migration from nodeB"),
        ("vmstate: local:vm-100-state.raw\n", None, "128", "a resume from hibernation"),
        ("lock: suspended\n", None, "128", "a resume from hibernation"),
    ],
)
def test_only_a_cold_start_uses_pending_values(extra, migrated_from, memory, resumes):
    config = VmConfig.parse(extra + CONFIG.text)
    start = start_config(config, migrated_from)
    assert (start.values["memory"], start.resumes) == (memory, resumes)


def test_a_migration_serves_exactly_the_nics_in_its_running_args():
    start = start_config(VmConfig.parse(f"args: {' '.join(nic_args(100, 1))}\n"), "nodeB")
    assert served_spec(VmSpec(100, (nic(1), nic(3))), start).nics == (nic(1),)
    cold = start_config(VmConfig.parse(f"args: {' '.join(nic_args(100, 1))}\n"), None)
    assert served_spec(VmSpec(100, (nic(1), nic(3))), cold).nics == (nic(1), nic(3))


def test_a_migration_refuses_a_nic_the_spec_no_longer_declares():
    start = start_config(CONFIG, "nodeB")
    with pytest.raises(StaleArgs, match="VM 100: its running args still have net2, which the spec no longer declares; "
                                         "restart the VM before migrating, or re-add the NIC"):
        served_spec(VmSpec(100, (nic(1),)), start)


def test_copied_args_name_the_clone_and_the_fix():
    start = start_config(VmConfig.parse(""), None)
    copied = tuple(nic_args(100, 1))
    no_spec = str(stale_args(VmSpec(200), copied, (), start))
    assert "VM 200 has the agent's vhost-user args but no spec; they use the socket of VM 100" in no_spec
    assert "pve-vhost-agent apply 200" in no_spec and "nic add 200" in no_spec
    declared = str(stale_args(VmSpec(200, (nic(1, 200),)), copied, tuple(nic_args(200, 1)), start))
    assert "net1: socket changed from /run/pve-vhost-agent/ovs/vm-100-1.sock to " in declared and "a clone or restore copied that VM's args" in declared
    assert stale_args(VmSpec(200, (nic(1, 200),)), tuple(nic_args(200, 1)), tuple(nic_args(200, 1)), start) is None


def port(name, **iface):
    return OvsPort(name, "br0", interfaces=(OvsInterface(name, "dpdkvhostuserclient", **iface),))


@pytest.mark.parametrize(
    "iface, problem, waiting",
    [
        ({"ofport": 1}, None, ()),
        ({}, None, ("vhu100i1",)),
        ({"ofport": -1, "error": "could not open network device vhu100i1 (Address family not supported by protocol)"},
         "VM 100 net1: ovs-vswitchd could not open port vhu100i1: could not open network device vhu100i1 "
         "(Address family not supported by protocol)", ()),
        ({"ofport": -1}, "VM 100 net1: ovs-vswitchd could not open port vhu100i1: ofport -1, no error text", ()),
    ],
)
def test_ports_ovs_could_not_open_are_problems(iface, problem, waiting):
    state = OvsState(ports=(port("vhu100i1", **iface),))
    problems, pending = port_problems(VmSpec(100, (nic(1),)), state)
    assert problems == ((problem,) if problem else ()) and pending == waiting


def test_external_nics_have_no_ovs_port_to_check():
    external = VhostNic(100, 1, "br0", "02:00:00:00:00:01", backend=Backend.EXTERNAL)
    assert port_problems(VmSpec(100, (external,)), OvsState()) == ((), ())
