"""The service's planner as tables: an observed node in, actions and problems out (no I/O)."""

import dataclasses
import datetime
from pathlib import Path

import pytest

from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.plan.status import node_summary, status_line
from builders import after, linux_host
from pve_vhost_agent.model.actions import DelPort, DelSocket, RestoreTapVlan, SetTapQinQ, WriteVmArgs
from pve_vhost_agent.model.lbactions import AddSVlanBridge, DelSVlanBridge, SetLinuxTapQinQ
from pve_vhost_agent.model.netdevs import LinkState
from pve_vhost_agent.model.ovs import FrozenMap, OvsBridge, OvsInterface, OvsPort, OvsState, PortVlan
from pve_vhost_agent.formats.qemuargs import merge_agent_args
from pve_vhost_agent.plan.node import NodePlan, plan_node
from pve_vhost_agent.plan.observed import OVSDB_PROBLEM, LocalVm, NodeState, Problem
from pve_vhost_agent.model.spec import Backend, ClusterSpec, QinQ, TapQinQ, VhostNic
from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.plan.marks import with_marks

RUN = Path("/run/pve-vhost-agent")
DIRS = {b: RUN / b.value for b in Backend}
QEMU = (9, 0, 0)
HOOK = "hookscript: local:snippets/pve-vhost-agent\n"
BASE = "boot: order=scsi0\nballoon: 0\nmemory: 4096\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=20\n"
SPEC = ClusterSpec(
    nics=(VhostNic(100, 1, "vhostbr0", "02:00:00:00:01:01"), VhostNic(101, 1, "vhostbr0", "02:00:00:00:02:01")),
    tap_qinq=(TapQinQ(100, 0, QinQ(950)),),
)
TUNNEL = PortVlan("dot1q-tunnel", 950, (), (), "802.1ad")
PVE_TAG = PortVlan("", 20)  # what pve-bridge gives net0 with tag=20


def config(vmid=100, body=BASE, hook=True, synced=True, memory_in_args=None) -> LocalVm:
    """A VM config; `synced`: with the args the planner wants (for `memory_in_args` MiB)."""
    text = body + (HOOK if hook else "")
    if synced:
        effective = VmConfig.parse(text).effective()
        if memory_in_args:
            effective["memory"] = str(memory_in_args)
        plan = plan_args(SPEC.for_vm(vmid), effective, QEMU, DIRS)
        text += f"args: {merge_agent_args('', plan.args)}\n"
        if hook:  # an enabled VM in step carries the GUI marks too
            text = with_marks(VmConfig.parse(text), SPEC.for_vm(vmid).nics).text
    return LocalVm(vmid, VmConfig.parse(text))


def ids(owner, vmid, nic, **extra):
    return FrozenMap({"pve-vhost-agent:owner": owner, "pve-vhost-agent:vmid": str(vmid),
                      "pve-vhost-agent:nic": nic, **extra})


def vhost(vmid, index=1):
    name = f"vhu{vmid}i{index}"
    iface = OvsInterface(name, "dpdkvhostuserclient", FrozenMap({"vhost-server-path": str(RUN / f"ovs/vm-{vmid}-{index}.sock")}),
                         status=FrozenMap({"mode": "client", "status": "connected"}))
    return OvsPort(name, "vhostbr0", PortVlan(), ids("port", vmid, f"net{index}"), (iface,))


def tap(vmid=100, vlan=PVE_TAG, owned=False):
    name = f"tap{vmid}i0"
    extra = ids("vlan", vmid, "net0", **{"pve-vhost-agent:saved-vlan": PVE_TAG.to_json()}) if owned else FrozenMap()
    return OvsPort(name, "vmbr0", vlan, extra, (OvsInterface(name),))


def ovs(*ports):
    return OvsState(bridges=(OvsBridge("vhostbr0", "netdev"), OvsBridge("vmbr0", "netdev")), ports=ports,
                    other_config=FrozenMap({"vlan-limit": "2"}), iface_types=("dpdkvhostuserclient", "system"),
                    probed_vlan_headers=FrozenMap({"netdev": "2"}), datapath_owners=FrozenMap({"netdev": "datapath"}))


def node(*vms, running=(), busy=(), ports=(), sockets=(), remote=None, **kw) -> NodeState:
    fields = dict(vms=vms, running=frozenset(running), busy=frozenset(busy), remote_nodes=remote or {},
                  spec=SPEC, ovs=ovs(*ports), ovs_sockets=tuple(sockets), socket_dirs=DIRS, qemu_version=QEMU)
    return NodeState(**{**fields, **kw})


# --- args -------------------------------------------------------------------------------


def test_a_node_in_step_plans_nothing():
    state = node(config(100), config(101), running=[100], ports=[vhost(100), tap(100, TUNNEL, owned=True)],
                 sockets=["vm-100-1.sock"])
    assert plan_node(state) == NodePlan()


def test_memory_changed_on_a_stopped_vm_rewrites_its_args():
    plan = plan_node(node(config(100, BASE.replace("4096", "8192"), memory_in_args=4096)))
    assert plan == NodePlan((WriteVmArgs(100, "memory changed from 4096 to 8192 MiB since the args were written"),))


@pytest.mark.parametrize("vm, why", [
    (config(100, hook=False, synced=False), "hookscript is not the agent's: not the agent's VM"),
    (config(100, BASE + "lock: backup\n", synced=False), "Proxmox holds `lock: backup`: it refuses writes"),
])
def test_stale_args_left_alone(vm, why):
    assert plan_node(node(vm)).actions == (), why


def test_a_vm_without_spec_loses_only_agent_args_once_enabled():
    vm = config(102, BASE + "args: -smbios type=1 -object memory-backend-memfd,id=vhu-mem,size=4096M,share=on "
                "-machine memory-backend=vhu-mem\n", synced=False)
    assert plan_node(node(vm)).actions == (WriteVmArgs(102, "the args share guest memory, which is no longer needed"),)


def test_a_refused_vm_is_a_problem_and_the_others_still_get_their_plan():
    refused = config(101, BASE.replace("balloon: 0\n", ""), synced=False)
    plan = plan_node(node(config(100, synced=False), refused))
    assert [type(a) for a in plan.actions] == [WriteVmArgs] and plan.actions[0].vmid == 100
    assert [(p.vmid, p.exit_code) for p in plan.problems] == [(101, 8)]
    assert "ballooning" in str(plan.problems[0]) and str(plan.problems[0]).startswith("VM 101 ")


def test_no_qemu_version_no_args_decision():
    problem = Problem(None, "no QEMU found")
    plan = plan_node(node(config(100, synced=False), qemu_version=None, problems=(problem,)))
    assert plan == NodePlan((), (problem,))


# --- tap QinQ ---------------------------------------------------------------------------


def test_a_re_plugged_tap_of_a_running_vm_gets_qinq_back():
    plan = plan_node(node(config(100), running=[100], ports=[vhost(100), tap(100, PVE_TAG)]))
    assert plan.actions == (SetTapQinQ("tap100i0", 100, "net0", TUNNEL, PVE_TAG),)
    assert plan.guards == {100: True}  # applied only while the VM still runs
    assert plan.actions[0].sentence() == "make Proxmox's tap100i0 a QinQ port: S-tag 950 (802.1ad)"


def test_a_qinq_entry_removed_while_running_restores_proxmox_settings():
    spec = dataclasses.replace(SPEC, tap_qinq=())
    plan = plan_node(node(config(100), running=[100], ports=[vhost(100), tap(100, TUNNEL, owned=True)], spec=spec))
    assert plan.actions == (RestoreTapVlan("tap100i0", PVE_TAG, 100),) and plan.guards == {100: True}


def test_a_running_vm_whose_tap_is_not_in_ovs_is_a_problem():
    plan = plan_node(node(config(100), running=[100], ports=[vhost(100)]))
    assert plan.actions == () and [p.exit_code for p in plan.problems] == [5]
    assert "Open vSwitch has no port tap100i0" in str(plan.problems[0])


def test_taps_of_stopped_vms_are_not_qinq_work():
    assert plan_node(node(config(100))).actions == ()


# --- leftovers and sockets ------------------------------------------------------------------


def test_ports_and_sockets_of_a_vm_migrated_away_are_removed():
    plan = plan_node(node(ports=[vhost(100), tap(100, TUNNEL, owned=True)], remote={100: "pve2"},
                          sockets=["vm-100-1.sock", "vm-100-x.sock", "other.sock"]))
    gone = "VM 100 migrated to node pve2"
    assert plan.actions == (
        DelPort("vhu100i1", "vhostbr0", 100, gone), RestoreTapVlan("tap100i0", PVE_TAG, 100, gone),
        DelSocket(100, "/run/pve-vhost-agent/ovs/vm-100-1.sock"),
    )
    assert plan.guards == {100: False}  # applied only while the VM still does not run here
    assert plan.actions[0].sentence() == "remove vhost-user port vhu100i1 from vhostbr0 (VM 100 migrated to node pve2)"


@pytest.mark.parametrize("vm, reason", [
    (config(100), "VM 100 does not run: a failed start or a stop without post-stop"),
    (config(100, hook=False, synced=False), "VM 100 does not run and its hookscript is not the agent's"),
    (None, "VM 100 was destroyed"),
])
def test_leftovers_say_why(vm, reason):
    state = node(*([vm] if vm else []), ports=[vhost(100)])
    assert plan_node(state).actions == (DelPort("vhu100i1", "vhostbr0", 100, reason),)


def test_a_busy_vm_is_never_touched_but_looked_at_again_soon():
    # Between pre-start (ports made) and QEMU's pidfile, the VM is locked and not running.
    state = node(config(100, BASE.replace("4096", "8192"), memory_in_args=4096), ports=[vhost(100)],
                 sockets=["vm-100-1.sock"], busy=[100])
    assert plan_node(state) == NodePlan(deferred=(100,))
    idle_busy = node(config(101), busy=[101])
    assert plan_node(idle_busy) == NodePlan()


def test_running_vms_keep_their_ports_and_sockets_even_when_disabled():
    state = node(config(100, hook=False, synced=False), running=[100], ports=[vhost(100)], sockets=["vm-100-1.sock"])
    assert plan_node(state).actions == ()


def test_without_ovs_only_args_and_sockets_are_planned():
    problem = Problem(None, "cannot reach OVSDB", 6)
    state = node(config(100, BASE.replace("4096", "2048"), memory_in_args=4096), ovs=None, problems=(problem,),
                 sockets=["vm-100-1.sock"])
    plan = plan_node(state)
    assert [type(a) for a in plan.actions] == [WriteVmArgs, DelSocket] and plan.problems == (problem,)


def test_an_unreadable_spec_still_collects_leftovers():
    problem = Problem(None, "spec file line 3: bad", 3)
    plan = plan_node(node(config(100, synced=False), ports=[vhost(101)], spec=None, problems=(problem,)))
    assert [type(a) for a in plan.actions] == [DelPort] and plan.problems == (problem,)


# --- tap QinQ on Linux bridges ------------------------------------------------------------

ON_950 = BASE.replace("tag=20", "tag=950")
NO_OVS = Problem(None, "cannot reach OVSDB at unix:/x (No such file)", 6, OVSDB_PROBLEM)


def linux_node(*vms, links: LinkState, **kw) -> NodeState:
    return node(*vms, ovs=None, problems=(NO_OVS,), netdevs=links, **kw)


TAP_ONLY = ClusterSpec(tap_qinq=SPEC.tap_qinq)  # VM 100's QinQ tap (on vmbr0, a Linux bridge), no vhost-user NIC


def test_a_running_vm_on_a_linux_bridge_gets_its_qinq_without_open_vswitch():
    plan = plan_node(linux_node(config(100, ON_950, synced=False), running=[100], links=linux_host(), spec=TAP_ONLY))
    assert [type(a) for a in plan.actions] == [AddSVlanBridge, SetLinuxTapQinQ]
    assert plan.guards == {100: True} and plan.problems == ()  # nothing here needs Open vSwitch: its absence is none
    # VM 100's vhost-user NIC (ovs backend) needs it: then its absence is the node's problem.
    plan = plan_node(linux_node(config(100, ON_950), running=[100], links=linux_host()))
    assert [type(a) for a in plan.actions] == [AddSVlanBridge, SetLinuxTapQinQ] and plan.problems == (NO_OVS,)


def test_s_vlan_devices_no_tap_uses_go_unless_a_running_or_starting_vm_needs_them():
    host = linux_host()
    done = after(host, plan_node(linux_node(config(100, ON_950), running=[100], links=host)).actions)
    stopped = LinkState(tuple(link for link in done.links if link.name != "tap100i0"))
    plan = plan_node(linux_node(config(100, ON_950), links=stopped))
    assert plan.actions == (DelSVlanBridge("vmbr0", 950, "802.1ad", ("vmbr0a950u", "vmbr0a950"), "no QinQ tap uses it"),)
    assert plan.guards == {}
    assert plan_node(linux_node(config(100, ON_950), busy=[100], links=stopped)).actions == ()
    for spec, shown in ((TAP_ONLY, "Open vSwitch not needed, 1 QinQ tap; last pass 14:02:11 ok; 0 problems"),
                        (SPEC, "Open vSwitch unreachable, 1 QinQ tap; last pass 14:02:11; 1 problem, first: cannot")):
        running = linux_node(config(100, ON_950, synced=spec is SPEC), running=[100], links=done, spec=spec)
        assert status_line(node_summary(running, plan_node(running)), WHEN).startswith("1 VM (1 running): " + shown)


# --- the status line ----------------------------------------------------------------------


WHEN = datetime.datetime(2026, 1, 2, 14, 2, 11)


def test_status_line_counts_vms_ports_and_taps():
    state = node(config(100), config(101), running=[100], ports=[vhost(100), tap(100, TUNNEL, owned=True)])
    line = status_line(node_summary(state, plan_node(state)), WHEN)
    assert line == "2 VMs (1 running): 1 vhost-user port (1 connected), 1 QinQ tap; last pass 14:02:11 ok; 0 problems"


def test_status_line_names_pending_changes_and_the_first_problem():
    state = node(config(100, synced=False), config(101, BASE.replace("balloon: 0\n", ""), synced=False))
    line = status_line(node_summary(state, plan_node(state)), WHEN, "checked")
    assert line.startswith("2 VMs (0 running): 0 vhost-user ports (0 connected), 0 QinQ taps; checked 14:02:11; "
                           "1 change pending; 1 problem, first: VM 101 has ballooning on")


def test_status_line_when_ovs_is_down():
    state = node(ovs=None, problems=(Problem(None, "cannot reach OVSDB at unix:/x (No such file)", 6),))
    assert status_line(node_summary(state, plan_node(state)), WHEN) == (
        "0 VMs (0 running): Open vSwitch unreachable; last pass 14:02:11; 1 problem, first: "
        "cannot reach OVSDB at unix:/x (No such file)")


# --- vhost-user ports of a running VM -----------------------------------------------------


def test_a_running_vm_gets_its_port_back_and_hears_what_waits_for_its_next_start():
    gone = node(config(100), running=[100], ports=[tap(100, TUNNEL, owned=True)], sockets=["vm-100-1.sock"])
    plan = plan_node(gone)
    assert [type(a).__name__ for a in plan.actions] == ["AddVhostPort"] and plan.guards == {100: True}
    assert plan.actions[0].sentence() == "add vhost-user port vhu100i1 on vhostbr0: all VLANs"

    not_served = plan_node(dataclasses.replace(gone, ovs_sockets=()))
    assert not_served.actions == () and not_served.at_next_start == (
        "VM 100: port vhu100i1 (the running QEMU has no net1 yet) takes effect at the next start",)
    assert plan_node(dataclasses.replace(gone, running=frozenset(), busy=frozenset({100}))).actions == ()
