"""What the service does on this node in one pass: observed node state in, actions out.

Pure. Hooks cannot cover everything: after a live migration the source runs no stop
hook, a QEMU start that fails after pre-start runs none, a re-plugged tap (tag, trunks
or firewall changed on a running VM) loses its QinQ with no hook, and `qm set --memory`
on a stopped VM makes its memory backend size stale. So the service compares, every
pass, what is declared with what is there, using the same planners as `apply` and the
hook phases.

A VM whose Proxmox lock is held (a start, stop, migration or `qm set` under way) is never
touched: between pre-start and QEMU's pidfile its ports are needed. Actions that depend
on whether a VM runs say so (`while_running`); the service applies them only under the
VM's lock, after checking that again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Mapping, Union

from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.plan.argsync import sync_args
from pve_vhost_agent.errors import AgentError, ExitCode
from pve_vhost_agent.model.actions import OvsAction
from pve_vhost_agent.plan.ovs import plan_gc, plan_live_vhost_ports, plan_tap_qinq
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.model.names import is_agent_hook, socket_vmid
from pve_vhost_agent.model.spec import Backend, ClusterSpec
from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig


# --- what was observed ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something the service cannot fix by itself: one line, problem and fix."""

    vmid: int | None
    message: str
    exit_code: int = int(ExitCode.FAILURE)

    @classmethod
    def of(cls, err: AgentError, vmid: int | None = None) -> "Problem":
        return cls(vmid, str(err), int(err.exit_code))

    def __str__(self) -> str:
        if self.vmid is None or f"VM {self.vmid}" in self.message:
            return self.message
        return f"VM {self.vmid}: {self.message}"


@dataclasses.dataclass(frozen=True)
class LocalVm:
    """A VM whose config lives in this node's folder."""

    vmid: int
    config: VmConfig

    @property
    def enabled(self) -> bool:
        """The agent's hookscript is set: the agent keeps its args and ports."""
        return is_agent_hook(self.config.section(MAIN).get("hookscript"))

    @property
    def proxmox_lock(self) -> str:
        """`lock:` of the config (backup, snapshot, ...): Proxmox refuses config writes then."""
        return self.config.section(MAIN).get("lock", "")


@dataclasses.dataclass(frozen=True)
class NodeState:
    """One observation of this node. `spec`, `ovs` or `qemu_version` is None when it could
    not be read; `problems` then says why."""

    vms: tuple[LocalVm, ...] = ()
    running: frozenset[int] = frozenset()  # QEMU runs here (pidfile of a live process)
    busy: frozenset[int] = frozenset()  # Proxmox's VM lock is held
    remote_nodes: Mapping[int, str] = dataclasses.field(default_factory=dict)  # VMs living elsewhere
    spec: ClusterSpec | None = ClusterSpec()
    ovs: OvsState | None = None
    ovs_sockets: tuple[str, ...] = ()  # socket file names in the `ovs` socket folder
    socket_dirs: Mapping[Backend, Path] = dataclasses.field(default_factory=dict)
    qemu_version: tuple[int, int, int] | None = None
    problems: tuple[Problem, ...] = ()

    @property
    def enabled_vms(self) -> tuple[LocalVm, ...]:
        return tuple(vm for vm in self.vms if vm.enabled)


# --- what the service does --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WriteVmArgs:
    """Write VM `vmid`'s args line as `apply` would (pending when it runs)."""

    vmid: int
    reason: str
    while_running: ClassVar[bool | None] = None  # apply_vm_args takes the VM lock itself


@dataclasses.dataclass(frozen=True)
class ApplyVhostPorts:
    """A running VM's vhost-user ports as declared again: VLAN and MTU in place, a missing
    port QEMU serves a socket for added again (ovsplan.plan_live_vhost_ports)."""

    vmid: int
    actions: tuple[OvsAction, ...]
    while_running: ClassVar[bool | None] = True


@dataclasses.dataclass(frozen=True)
class ApplyTapQinQ:
    """QinQ back on a running VM's tap ports (Proxmox re-plugged them), or taps restored."""

    vmid: int
    actions: tuple[OvsAction, ...]
    while_running: ClassVar[bool | None] = True


@dataclasses.dataclass(frozen=True)
class RemoveLeftovers:
    """Undo what the agent made in OVS for a VM that does not run here."""

    vmid: int
    reason: str
    actions: tuple[OvsAction, ...]
    while_running: ClassVar[bool | None] = False


@dataclasses.dataclass(frozen=True)
class DelSocket:
    """A socket file QEMU left in the `ovs` socket folder (never the `external` one)."""

    vmid: int
    path: str
    while_running: ClassVar[bool | None] = False


NodeAction = Union[WriteVmArgs, ApplyVhostPorts, ApplyTapQinQ, RemoveLeftovers, DelSocket]


@dataclasses.dataclass(frozen=True)
class NodePlan:
    actions: tuple[NodeAction, ...] = ()
    problems: tuple[Problem, ...] = ()
    # Busy VMs that have something to do once their lock is free: worth an early look.
    deferred: tuple[int, ...] = ()
    # Declared changes a running VM gets only at its next start (one line each).
    at_next_start: tuple[str, ...] = ()


def plan_node(state: NodeState) -> NodePlan:
    """Everything to do on this node now; a VM the planners refuse gives a Problem."""
    plan = _plan(state)
    if not state.busy:
        return plan
    unlocked = _plan(dataclasses.replace(state, busy=frozenset()))
    waiting = {a.vmid for a in unlocked.actions} | {p.vmid for p in unlocked.problems}
    return dataclasses.replace(plan, deferred=tuple(sorted(waiting & state.busy)))


def _plan(state: NodeState) -> NodePlan:
    problems = list(state.problems)
    args: list[NodeAction] = []
    qinq: list[NodeAction] = []
    later: list[str] = []
    for vm in state.enabled_vms:
        if vm.vmid in state.busy or state.spec is None:
            continue
        try:
            action = _args_action(vm, state)
            if action:
                args.append(action)
            if vm.vmid in state.running and state.ovs is not None:
                folder = state.socket_dirs.get(Backend.OVS)
                if folder is not None:
                    ports, waiting = plan_live_vhost_ports(state.spec.for_vm(vm.vmid), state.ovs, folder,
                                                           state.ovs_sockets)
                    later += waiting
                    if ports:
                        qinq.append(ApplyVhostPorts(vm.vmid, ports))
                taps = plan_tap_qinq(state.spec.for_vm(vm.vmid), state.ovs)
                if taps:
                    qinq.append(ApplyTapQinQ(vm.vmid, taps))
        except AgentError as err:
            problems.append(Problem.of(err, vm.vmid))
    live = state.running | state.busy
    return NodePlan(
        tuple(args) + tuple(qinq) + _leftovers(state, live) + _stale_sockets(state, live),
        tuple(problems),
        at_next_start=tuple(later),
    )


def _args_action(vm: LocalVm, state: NodeState) -> WriteVmArgs | None:
    spec = state.spec.for_vm(vm.vmid)
    if vm.proxmox_lock:
        return None  # Proxmox refuses the write until its task ends; checked again next pass
    if spec.nics and state.qemu_version is None:
        return None  # the node's QEMU problem is reported once, in state.problems
    # The same planning as `apply` (vmargs.sync_for), on the same inputs.
    plan = plan_args(spec, vm.config.effective(), state.qemu_version or (0, 0, 0), state.socket_dirs)
    sync = sync_args(vm.config, plan, vm.vmid in state.running)
    if sync.in_sync:
        return None
    return WriteVmArgs(vm.vmid, "; ".join(sync.changes))


def _leftovers(state: NodeState, live: frozenset[int]) -> tuple[NodeAction, ...]:
    if state.ovs is None:
        return ()
    by_vm: dict[int, list[OvsAction]] = {}
    for action in plan_gc(live, state.ovs):
        by_vm.setdefault(state.ovs.port(action.port).vmid, []).append(action)
    return tuple(RemoveLeftovers(vmid, _why_gone(state, vmid), tuple(actions))
                 for vmid, actions in sorted(by_vm.items()))


def _why_gone(state: NodeState, vmid: int) -> str:
    if vmid in state.remote_nodes:
        return f"VM {vmid} lives on node {state.remote_nodes[vmid]} now (migrated away)"
    local = next((vm for vm in state.vms if vm.vmid == vmid), None)
    if local is None:
        return f"VM {vmid} has no config on any node (destroyed)"
    if not local.enabled:
        return f"VM {vmid} does not run here and the agent's hookscript is off"
    return f"VM {vmid} does not run (a failed start, or a stop without post-stop)"


def _stale_sockets(state: NodeState, live: frozenset[int]) -> tuple[NodeAction, ...]:
    folder = state.socket_dirs.get(Backend.OVS)
    if folder is None:
        return ()
    stale = []
    for name in sorted(state.ovs_sockets):
        vmid = socket_vmid(name)
        if vmid is not None and vmid not in live:
            stale.append(DelSocket(vmid, str(folder / name)))
    return tuple(sorted(stale, key=lambda a: (a.vmid, a.path)))


def describe(action: NodeAction) -> str:
    """What an action does, for logs and humans (repr() gives every field)."""
    if isinstance(action, WriteVmArgs):
        return f"VM {action.vmid}: write its args line ({action.reason})"
    if isinstance(action, DelSocket):
        return f"VM {action.vmid}: remove the stale socket {action.path}"
    steps = ", ".join(f"{type(a).__name__} {getattr(a, 'port', getattr(a, 'datapath_type', ''))}".rstrip()
                      for a in action.actions)
    if isinstance(action, ApplyTapQinQ):
        return f"VM {action.vmid}: tap ports as declared again: {steps}"
    if isinstance(action, ApplyVhostPorts):
        return f"VM {action.vmid}: vhost-user ports as declared again: {steps}"
    return f"{action.reason}: {steps}"
