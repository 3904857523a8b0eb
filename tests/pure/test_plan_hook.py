"""The hook phases as tables: what pre-start observed in, the refusal or the plan out."""

import dataclasses

import pytest

from builders import ROUTER, SOCKET_DIRS, SOCKETS, ids, linux_host, nic, ovs_state, tap_port, vhost_port, vm_config
from pve_vhost_agent.errors import ConfigConflict, MemoryLayoutError, NetworkRefused, NotFound, OvsRefused, StaleArgs
from pve_vhost_agent.formats.qemuargs import merge_agent_args
from pve_vhost_agent.model.actions import AddVhostPort, DelPort, EnsureBridge, MakeSocketDir, ReplaceVhostPort
from pve_vhost_agent.model.host import Folder, HostMemory
from pve_vhost_agent.model.ovs import OvsBridge, PortVlan
from pve_vhost_agent.model.spec import Backend, QinQ, TapQinQ, VlanPolicy, VmSpec
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.plan.hook import StartView, plan_pre_start, post_start_report, undo_start

QEMU = (9, 0, 0)
PLENTY = HostMemory(available_kib=64 << 20, hugepages_free={})
FOLDERS = {b: Folder(str(path), exists=True) for b, path in SOCKET_DIRS.items()}
QINQ_NIC = nic(1, vlan=VlanPolicy(qinq=QinQ(950, (10, 20))))
TAP = TapQinQ(100, 0, QinQ(100))
NET0 = "virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=100"


def view(spec=VmSpec(100, (QINQ_NIC,), (TAP,)), body=ROUTER, args=True, args_for=None, **kw) -> StartView:
    """A start of VM 100 whose args were planned for its config (or for `args_for`), or
    without args when `args` is False."""
    config = vm_config(body, net0=NET0)
    if args:
        planned = plan_args(spec, vm_config(args_for or body, net0=NET0).effective(), QEMU, SOCKET_DIRS).args
        config = vm_config(body, net0=NET0, args=merge_agent_args("", planned))
    fields = dict(qemu_version=QEMU, memory=PLENTY, folders=FOLDERS, ovs=ovs_state())
    return StartView(spec, config, None, SOCKET_DIRS, **{**fields, **kw})


def test_a_ready_start_adds_its_port_and_says_what_it_checked():
    plan = plan_pre_start(view())
    add = AddVhostPort("vhu100i1", "vhostbr0", 100, "net1", str(SOCKETS / "vm-100-1.sock"),
                       PortVlan("dot1q-tunnel", 950, (), (10, 20), "802.1ad"))
    assert plan.actions == (add,) and plan.ports == ("vhu100i1",) and plan.warnings == ()
    assert [n.text for n in plan.notes] == ["args line matches the spec (net1)", "QinQ can hold on tap100i0 (S-tag 100)"]
    assert [n.check for n in plan.notes] == ["CheckArgs", "CheckTapQinQ"]


def test_a_second_start_with_its_port_in_place_changes_nothing():
    port = vhost_port("vhu100i1", vlan=PortVlan("dot1q-tunnel", 950, (), (10, 20), "802.1ad"),
                      socket=str(SOCKETS / "vm-100-1.sock"), external_ids=_ids(1))
    assert plan_pre_start(view(ovs=ovs_state(port))).actions == ()


def test_missing_folders_and_bridges_are_made_in_order():
    missing = {b: dataclasses.replace(f, exists=False) for b, f in FOLDERS.items()}
    plan = plan_pre_start(view(folders=missing, ovs=ovs_state(bridges=(OvsBridge("vmbr0", "netdev"),))))
    assert [type(a) for a in plan.actions] == [MakeSocketDir, EnsureBridge, AddVhostPort]
    assert plan.actions[0].path == str(SOCKETS)


REFUSALS = [
    ("stale args: memory changed", dict(body=ROUTER.replace("4096", "6144"), args_for=ROUTER), StaleArgs,
     "memory changed from 4096 to 6144 MiB since the args were written"),
    ("ballooning on", dict(body=ROUTER.replace("balloon: 0\n", ""), args=False), MemoryLayoutError, "balloon 0"),
    ("a folder anyone may write to",
     dict(folders={**FOLDERS, Backend.OVS: Folder(str(SOCKETS), True, "writable by others (mode 0777)")}),
     ConfigConflict, "refusing the socket folder /run/pve-vhost-agent/ovs: writable by others"),
    ("the tap's bridge is not in OVS", dict(ovs=ovs_state(bridges=())), NotFound, "has no bridge vmbr0"),
    ("vlan-limit 1 on a running datapath", dict(ovs=ovs_state(vlan_limit="1", probed=(("netdev", "1"),))),
     OvsRefused, "vlan-limit"),
]


@pytest.mark.parametrize("what, changes, error, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_start_that_cannot_work_is_refused_with_one_line(what, changes, error, words):
    with pytest.raises(error) as caught:
        plan_pre_start(view(**changes))
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_an_external_switch_must_listen():
    ext = dataclasses.replace(nic(2), backend=Backend.EXTERNAL)
    spec = VmSpec(100, (ext,))
    plan = plan_pre_start(view(spec, external={2: None}))
    assert plan.actions == () and plan.ports == ()
    with pytest.raises(ConfigConflict, match="nothing listens on /run/pve-vhost-agent/external/vm-100-2.sock "
                                             r"\(Connection refused\), and QEMU would wait for it forever"):
        plan_pre_start(view(spec, external={2: "Connection refused"}))


def test_short_memory_is_a_warning_never_a_refusal():
    plan = plan_pre_start(view(memory=HostMemory(available_kib=1024 * 1024, hugepages_free={})))
    assert len(plan.warnings) == 1 and "4096 MiB of shared guest memory" in plan.warnings[0].text
    assert [type(a) for a in plan.actions] == [AddVhostPort]


def test_a_migration_serves_the_nics_it_runs_with_from_the_main_section():
    running = VmSpec(100, (QINQ_NIC,))
    start = view(running)
    grown = dataclasses.replace(start, spec=VmSpec(100, (QINQ_NIC, nic(2))), migrated_from="pve1")
    plan = plan_pre_start(grown)  # net2 was declared while it ran: not in its args, not served
    assert plan.served.nics == (QINQ_NIC,)
    assert [n.text for n in plan.notes] == ["args line matches the spec (net1), as a migration from pve1 runs it"]


def test_an_aborted_start_removes_exactly_the_ports_it_added():
    add0 = AddVhostPort("vhu100i0", "vhostbr0", 100, "net0", "/s/0", PortVlan())
    add1 = AddVhostPort("vhu100i1", "vhostbr1", 100, "net1", "/s/1", PortVlan())
    done = (EnsureBridge("vhostbr1", "netdev"), add0, ReplaceVhostPort("socket changed", add1))
    assert undo_start(done) == (DelPort("vhu100i1", "vhostbr1", 100, "the start was aborted"),
                                DelPort("vhu100i0", "vhostbr0", 100, "the start was aborted"))


def test_post_start_reports_each_port_and_warns_about_a_missing_one():
    port = vhost_port("vhu100i1", status={"mode": "client", "status": "connected", "n_rxq": "1"}, external_ids=_ids(1))
    notes, warnings = post_start_report(VmSpec(100, (QINQ_NIC,)), ovs_state(port), None)
    assert [n.text for n in notes] == ["port vhu100i1 on vhostbr0: mode client, status connected"] and warnings == ()
    notes, warnings = post_start_report(VmSpec(100, (QINQ_NIC,)), ovs_state(tap_port()), None)
    assert notes == () and [(w.text, w.nic, w.port) for w in warnings] == [
        ("VM 100 net1: Open vSwitch has no port vhu100i1", "net1", "vhu100i1")]


def _ids(index):
    return ids("port", 100, f"net{index}")


def test_qinq_on_a_linux_bridge_is_checked_against_the_links_and_needs_no_open_vswitch():
    tap_only = VmSpec(100, (), (TapQinQ(100, 0, QinQ(100)),))
    host = linux_host(taps=())
    plan = plan_pre_start(view(tap_only, args=False, ovs=None, netdevs=host))
    assert [n.text for n in plan.notes] == ["QinQ can hold on tap100i0 (S-tag 100)"] and plan.actions == ()
    with pytest.raises(NetworkRefused) as caught:
        plan_pre_start(view(tap_only, args=False, ovs=None, netdevs=linux_host(uplink_mtu=1500, taps=())))
    assert caught.value.exit_code == 8 and "uplink eth0 of vmbr0 has MTU 1500" in str(caught.value)
