"""The doctor inside the service: a finding is logged once when it appears and once when it is
gone (not every pass), and `status` counts the error-level findings. A private OVS (the
service collects ports of VMs that do not run here: it must not share a switch)."""

import json
import logging

import pytest

from fixtures.ovs import start_ovs
from pve_vhost_agent.flows.service import Service

ROUTER = "balloon: 0\nmemory: 2048\nname: router\n"
# The agent's args copied by `qm clone` without the hookscript: nothing makes its ports.
ARGS = ("args: -chardev socket,id=vhu-net1,path=/run/pve-vhost-agent/ovs/vm-100-1.sock,server=on,wait=off "
        "-netdev type=vhost-user,id=vhu-net1,chardev=vhu-net1,vhostforce=on\n")
FINDING = ("error: VM 100: its args line carries the agent's vhost-user options but its hookscript is unset, so "
           "nothing makes its Open vSwitch ports and QEMU waits for them at start; run `pve-vhost-agent enable 100` "
           "(or `pve-vhost-agent apply 100` when the declarations are gone, to drop those options)")
NO_FILE = ("info: /etc/network/interfaces: does not exist, so the file-against-kernel checks are skipped; nothing to "
           "do unless ifupdown2 should manage this host's network")


@pytest.fixture(scope="module")
def switch():
    inst = start_ovs("h10ds", other_config={"vlan-limit": "2"})
    yield inst
    inst.stop()


def doctor_lines(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "pve_vhost_agent.flows.doctor"]
    caplog.clear()
    return lines


def test_the_service_logs_a_finding_once_and_counts_errors_in_its_status(pve_root, switch, caplog):
    caplog.set_level(logging.INFO, logger="pve_vhost_agent")
    pve_root.write_vm(100, ROUTER + ARGS)
    with Service(pve_root.settings(ovsdb=switch.remote)) as service:
        first = service.run_pass()
        assert doctor_lines(caplog) == [f"doctor: {FINDING}", f"doctor: {NO_FILE}"]
        assert first.doctor_errors == 1 and first.summary()["doctor_errors"] == 1
        assert first.line().endswith("; doctor: 1 error (pve-vhost-agent doctor)")
        assert service.run_pass().doctor_errors == 1
        assert doctor_lines(caplog) == []  # nothing new: nothing logged

        pve_root.write_vm(100, ROUTER)  # fixed (`pve-vhost-agent apply 100` drops the args)
        fixed = service.run_pass()
    assert fixed.doctor_errors == 0 and "doctor" not in fixed.line()
    assert doctor_lines(caplog) == [f"doctor: resolved: {FINDING}"]


def test_status_counts_the_doctors_errors(pve_root, switch):
    pve_root.write_vm(100, ROUTER + ARGS)
    done = pve_root.cli("--ovsdb", switch.remote, "status", "--json")
    report = json.loads(done.stdout)
    assert report["doctor_errors"] == 1 and report["line"].endswith("; doctor: 1 error (pve-vhost-agent doctor)")
    assert done.stderr == ""  # `status` logs nothing of the doctor's
