"""What the service does on this node in one pass: observed node state in, actions out.

Pure. Hooks cannot cover everything: after a live migration the source runs no stop
hook, a QEMU start that fails after pre-start runs none, a re-plugged tap (tag, trunks
or firewall changed on a running VM) loses its QinQ with no hook, and `qm set --memory`
on a stopped VM makes its memory backend size stale, and a link end's peer may move to
another node (its running QEMU's socket must then point there). So the service compares,
every pass, what is declared with what is there, using the same planners as `apply` and
the hook phases.

A VM whose Proxmox lock is held (a start, stop, migration or `qm set` under way) is never
touched: between pre-start and QEMU's pidfile its ports are needed. Actions that depend
on whether a VM runs are listed in the plan's `guards` (VM id -> runs); the service applies
them only under the VM's lock, after checking that again.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from pve_vhost_agent.errors import AgentError, ExitCode, Unexpected
from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.formats.vmconfig import MAIN
from pve_vhost_agent.model.actions import Action, DelSocket, WriteVmArgs
from pve_vhost_agent.model.lbactions import DelSVlanBridge, RestoreLinuxTap
from pve_vhost_agent.model.host import CLUSTER_FS_NOT_MOUNTED, CLUSTER_FS_READ_ONLY
from pve_vhost_agent.model.names import socket_vmid
from pve_vhost_agent.model.spec import Backend
from pve_vhost_agent.plan import lbqinq
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.plan.argsync import sync_args
from pve_vhost_agent.plan.links import plan_link_sockets, wanted_sockets
from pve_vhost_agent.plan.observed import OVSDB_PROBLEM, LocalVm, NodeState, Problem
from pve_vhost_agent.plan.ovs import plan_gc, plan_live_vhost_ports, plan_tap_qinq


@dataclasses.dataclass(frozen=True)
class NodePlan:
    actions: tuple[Action, ...] = ()
    problems: tuple[Problem, ...] = ()
    # VM id -> whether its actions need it running (True) or stopped (False); the service
    # checks that again under the VM's lock. Args writes take that lock themselves.
    guards: Mapping[int, bool] = dataclasses.field(default_factory=dict)
    # Busy VMs that have something to do once their lock is free: worth an early look.
    deferred: tuple[int, ...] = ()
    # Declared changes a running VM gets only at its next start (one line each).
    at_next_start: tuple[str, ...] = ()


def plan_node(state: NodeState) -> NodePlan:
    """Everything to do on this node now; a VM the planners refuse gives a Problem.

    A VM whose lock is held is planned like the others, but its work is only noted
    (`deferred`): whoever holds the lock is changing it.
    """
    problems = list(state.problems)
    if state.cluster_fs == CLUSTER_FS_NOT_MOUNTED:
        # /etc/pve is an empty folder: every VM would look destroyed. Touch nothing.
        return NodePlan(problems=tuple(problems))
    writable = state.cluster_fs != CLUSTER_FS_READ_ONLY  # no quorum: no config can be written
    args: list[Action] = []
    ports: list[Action] = []
    later: list[str] = []
    guards: dict[int, bool] = {}
    if state.spec is not None:
        for vm in state.enabled_vms:
            try:
                action = _args_action(vm, state) if writable else None
                if action:
                    args.append(action)
                if vm.vmid in state.running and state.ovs is not None:
                    vm_ports, waiting = _live_ports(vm, state)
                    later += waiting
                    ports += vm_ports
                    guards.update({a.vmid: True for a in vm_ports if getattr(a, "vmid", None) is not None})
                if vm.vmid in state.running and state.netdevs is not None:
                    taps = _linux_taps(vm, state)
                    ports += taps
                    guards.update({a.vmid: True for a in taps if getattr(a, "vmid", None) is not None})
                if vm.vmid in state.links and state.link_facts is not None:
                    ends = state.spec.for_vm(vm.vmid).links
                    decided = plan_link_sockets(vm.vmid, ends, wanted_sockets(ends, state.link_facts),
                                                state.links[vm.vmid])
                    ports += decided.actions
                    later += decided.waiting
                    problems += [Problem(vm.vmid, line) for line in decided.dark]
                    guards.update({a.vmid: True for a in decided.actions})
            except AgentError as err:
                problems.append(Problem.of(err, vm.vmid))
            except Exception as err:  # noqa: BLE001 - a bug in one VM's planning must not stop the others'
                problems.append(Problem.of(Unexpected.of(err), vm.vmid))
    problems += [_not_enabled(vm) for vm in state.vms if not vm.enabled and _has_agent_netdevs(vm)]
    if state.ovs is None and not needs_ovs(state):
        problems = [p for p in problems if p.key != OVSDB_PROBLEM]  # nothing here is Open vSwitch's
    live = state.running | state.busy
    leftovers = _leftovers(state, live) + _linux_leftovers(state, live) + _stale_sockets(state, live)
    guards.update({a.vmid: False for a in leftovers if getattr(a, "vmid", None) is not None})
    actions = tuple(args) + tuple(ports) + leftovers
    busy = state.busy
    deferred = {a.vmid for a in actions if getattr(a, "vmid", None) in busy} | {p.vmid for p in problems if p.vmid in busy}
    return NodePlan(
        tuple(a for a in actions if getattr(a, "vmid", None) not in busy),
        tuple(p for p in problems if p.vmid not in busy or p in state.problems),
        {vmid: running for vmid, running in guards.items() if vmid not in busy},
        tuple(sorted(deferred)),
        tuple(later),
    )


def needs_ovs(state: NodeState) -> bool:
    """Whether an enabled VM of this node has something on Open vSwitch: a vhost-user NIC
    of the `ovs` backend, or tap QinQ whose bridge is not one of the host's Linux bridges.
    Link ends, external vhost-user NICs and QinQ on Linux bridges need no Open vSwitch.
    Unknown (the spec or the host's links unread), or no VM here declares anything (an
    outage of a switch nothing uses yet is still news): it does."""
    if state.spec is None or state.netdevs is None:
        return True
    declared = [(vm, spec) for vm in state.enabled_vms if (spec := state.spec.for_vm(vm.vmid))]
    if not declared:
        return True
    for vm, spec in declared:
        on_linux = lbqinq.linux_taps(spec, vm.config.section(MAIN), state.netdevs)
        if spec.ovs_nics or lbqinq.without_taps(spec, on_linux).tap_qinq:
            return True
    return False


def _has_agent_netdevs(vm: LocalVm) -> bool:
    """The next start would give QEMU the agent's vhost-user netdevs."""
    try:
        words = qemuargs.agent_args(vm.config.effective().get("args", ""))
    except AgentError:
        return False  # a line the agent cannot read is reported where it plans for the VM
    return any(word.startswith("type=vhost-user") for word in words)


def _not_enabled(vm: LocalVm) -> Problem:
    """Agent args without the agent's hookscript: nothing makes the ports, QEMU waits."""
    return Problem(vm.vmid, f"VM {vm.vmid} has the agent's vhost-user args but not its hookscript: it would start with "
                            f"a dead NIC (nothing makes its port); run `pve-vhost-agent enable {vm.vmid}` or `enable --all`",
                   int(ExitCode.CONFLICT), "not-enabled")


def _live_ports(vm: LocalVm, state: NodeState) -> tuple[tuple[Action, ...], tuple[str, ...]]:
    """A running VM's vhost-user ports and tap QinQ (on Open vSwitch) as declared again."""
    spec = state.spec.for_vm(vm.vmid)
    if state.netdevs is not None:
        spec = lbqinq.without_taps(spec, lbqinq.linux_taps(spec, vm.config.section(MAIN), state.netdevs))
    folder = state.socket_dirs.get(Backend.OVS)
    ports, waiting = (), ()
    if folder is not None:
        ports, waiting = plan_live_vhost_ports(spec, state.ovs, folder, state.ovs_sockets)
    return ports + plan_tap_qinq(spec, state.ovs), waiting


def _linux_taps(vm: LocalVm, state: NodeState) -> tuple[Action, ...]:
    """A running VM's QinQ taps on Linux bridges as declared again (Proxmox re-plugs a tap
    when its NIC's tag, trunks or firewall change)."""
    spec, running = state.spec.for_vm(vm.vmid), vm.config.section(MAIN)
    return lbqinq.plan_taps(vm.vmid, lbqinq.linux_taps(spec, running, state.netdevs), running, state.netdevs)


def _linux_leftovers(state: NodeState, live: frozenset[int]) -> tuple[Action, ...]:
    """Give back taps of VMs that do not run here; remove S-VLAN devices no QinQ tap uses
    and no running (or starting) VM's QinQ will use."""
    if state.netdevs is None:
        return ()
    needed = set()
    if state.spec is not None:
        for vm in state.vms:
            if vm.vmid in live:
                needed.update(lbqinq.svlan_keys(state.spec.for_vm(vm.vmid), vm.config.section(MAIN)))
    actions = lbqinq.plan_cleanup(state.netdevs, lambda vmid: vmid not in live, needed)
    return tuple(dataclasses.replace(a, reason=_why_gone(state, a.vmid)) if isinstance(a, RestoreLinuxTap)
                 else dataclasses.replace(a, reason="no QinQ tap uses it") if isinstance(a, DelSVlanBridge) else a
                 for a in actions)


def _args_action(vm: LocalVm, state: NodeState) -> WriteVmArgs | None:
    spec = state.spec.for_vm(vm.vmid)
    if vm.proxmox_lock:
        return None  # Proxmox refuses the write until its task ends; checked again next pass
    if spec.nics and state.qemu_version is None:
        return None  # the node's QEMU problem is reported once, in state.problems
    # The same planning as `apply` (vmargs.sync_for), on the same inputs.
    plan = plan_args(spec, vm.config.effective(), state.qemu_version or (0, 0, 0), state.socket_dirs)
    sync = sync_args(vm.config, plan, vm.vmid in state.running, spec.nics)  # an enabled VM: GUI marks too
    if sync.in_sync:
        return None
    return WriteVmArgs(vm.vmid, "; ".join(sync.changes))


def _leftovers(state: NodeState, live: frozenset[int]) -> tuple[Action, ...]:
    """Undo what the agent made in OVS for VMs that do not run here, saying why."""
    if state.ovs is None:
        return ()
    return tuple(dataclasses.replace(action, reason=_why_gone(state, action.vmid))
                 for action in plan_gc(live, state.ovs))


def _why_gone(state: NodeState, vmid: int) -> str:
    if vmid in state.remote_nodes:
        return f"VM {vmid} migrated to node {state.remote_nodes[vmid]}"
    local = next((vm for vm in state.vms if vm.vmid == vmid), None)
    if local is None:
        return f"VM {vmid} was destroyed"
    if not local.enabled:
        return f"VM {vmid} does not run and its hookscript is not the agent's"
    return f"VM {vmid} does not run: a failed start or a stop without post-stop"


def _stale_sockets(state: NodeState, live: frozenset[int]) -> tuple[Action, ...]:
    folder = state.socket_dirs.get(Backend.OVS)
    if folder is None:
        return ()
    stale = []
    for name in sorted(state.ovs_sockets):
        vmid = socket_vmid(name)
        if vmid is not None and vmid not in live:
            stale.append(DelSocket(vmid, str(folder / name)))
    return tuple(sorted(stale, key=lambda a: (a.vmid, a.path)))
