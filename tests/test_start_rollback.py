"""A pre-start that gives up leaves no port behind (issue 14: a boot storm's failures).

Proxmox runs no other hook for a start whose pre-start failed, so the agent's ports of
that start would stay in the switch. Here ovs-vswitchd is frozen (SIGSTOP) after pre-start
committed its port: the wait for it runs out, the start is aborted, and the port the
start added is removed again, committed without waiting for the frozen daemon.
"""

import logging
import os
import signal

import pytest

from pve_vhost_agent.errors import AgentTimeout
from pve_vhost_agent.flows.hook import HookCall, run_phase
from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.model.spec import VhostNic, VmSpec
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.formats.qemuargs import merge_agent_args
from pve_vhost_agent.adapters.qemu import installed_version

BRIDGE = "h3rb0"


@pytest.fixture
def frozen_dpdk(fresh_ovs):
    inst = fresh_ovs("rb", dpdk=True, other_config={"vlan-limit": "2"})
    inst.vsctl("add-br", BRIDGE, "--", "set", "Bridge", BRIDGE, "datapath_type=netdev")
    yield inst
    os.kill(inst.pids["ovs-vswitchd"], signal.SIGCONT)  # before the fixture stops it


def test_a_start_whose_ports_ovs_vswitchd_never_takes_is_aborted_without_leftovers(pve_root, frozen_dpdk, caplog):
    settings = pve_root.settings(ovsdb=frozen_dpdk.remote, ovs_timeout=3)
    nic = VhostNic(100, 1, BRIDGE, "02:00:00:00:64:01")
    vm = VmSpec(100, (nic,))
    body = "balloon: 0\nmemory: 256\n"
    planned = plan_args(vm, VmConfig.parse(body).effective(), installed_version(), settings.socket_dirs())
    config = VmConfig.parse(body + f"args: {merge_agent_args('', planned.args)}\n")

    os.kill(frozen_dpdk.pids["ovs-vswitchd"], signal.SIGSTOP)  # it takes no change from now on
    with caplog.at_level(logging.INFO), pytest.raises(AgentTimeout, match="ovs-vswitchd did not apply") as caught:
        run_phase(settings, HookCall(100, "pre-start", None), vm, config)
    # A stopped process uses no CPU: one window (ovs_timeout), not the busy limit of minutes.
    assert "used no CPU meanwhile: it looks stuck" in str(caught.value)
    # The port was committed, then removed: OVSDB (which still answers) has neither it nor its interface.
    assert frozen_dpdk.find("Port", "name=vhu100i1") == [] and frozen_dpdk.find("Interface", "name=vhu100i1") == []
    said = [r.getMessage() for r in caplog.records]
    assert f"add vhost-user port vhu100i1 on {BRIDGE}: all VLANs" in said
    assert f"remove vhost-user port vhu100i1 from {BRIDGE} (the start was aborted)" in said
