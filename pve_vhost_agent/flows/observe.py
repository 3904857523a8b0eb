"""Observing this node for the service and `status` (an edge): files, locks, OVS, QEMU.

Reads only. The order matters where a VM may be starting: its lock is probed before its
pidfile, so a start that begins in between shows as "not running" and the service's
apply step, which re-checks under the VM's lock, leaves it alone.
"""

from __future__ import annotations

from pve_vhost_agent.adapters import qemu, sockets
from pve_vhost_agent.errors import AgentError, OvsUnavailable
from pve_vhost_agent.adapters.ovsdb import UNREACHABLE_FIX, Ovsdb
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.plan.observed import LocalVm, NodeState, Problem
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.names import socket_vmid
from pve_vhost_agent.model.spec import Backend, ClusterSpec
from pve_vhost_agent.adapters.specstore import load_spec
from pve_vhost_agent.adapters.vmstore import local_vm_configs, vm_busy, vm_running


def observe_ovs(db: Ovsdb) -> tuple[OvsState | None, Problem | None]:
    """A current snapshot, or why there is none (the caller closes `db` then)."""
    try:
        state = db.snapshot()
        if not db.live():
            raise OvsUnavailable(f"lost the connection to OVSDB at {db.remote}", UNREACHABLE_FIX)
        return state, None
    except AgentError as err:
        return None, Problem.of(err)


def observe_node(settings: Settings, ovs: OvsState | None, ovs_problem: Problem | None = None,
                 remember: bool = True) -> NodeState:
    """This node as the service plans for it; `remember=False` (status, dry runs) writes nothing."""
    problems = [ovs_problem] if ovs_problem else []
    spec: ClusterSpec | None
    try:
        spec = load_spec(settings)
    except AgentError as err:
        spec, problems = None, problems + [Problem.of(err)]
    vms, unreadable = _local_vms(settings)
    problems += unreadable
    sockets = ovs_sockets(settings)
    owned = {p.vmid for p in ovs.owned_ports() if p.vmid is not None} if ovs else set()
    local = {vm.vmid for vm in vms}
    busy, running = set(), set()
    for vmid in sorted(local | owned | {socket_vmid(s) for s in sockets}):
        try:
            if vm_busy(settings, vmid):  # before the pidfile: see the module's doc
                busy.add(vmid)
        except AgentError as err:
            busy.add(vmid)  # cannot tell: never touch it
            problems.append(Problem.of(err, vmid))
        if vm_running(settings, vmid):
            running.add(vmid)
    version = None
    if spec is not None and any(spec.for_vm(vm.vmid).nics for vm in vms if vm.enabled):
        try:
            version = qemu.installed_version(cache_dir=settings.run_dir, remember=remember)
        except AgentError as err:
            problems.append(Problem.of(err))
    return NodeState(
        vms=vms,
        running=frozenset(running),
        busy=frozenset(busy),
        remote_nodes=_remote_nodes(settings, (owned | busy | running) - local),
        spec=spec,
        ovs=ovs,
        ovs_sockets=sockets,
        socket_dirs={backend: settings.socket_dir(backend.value) for backend in Backend},
        qemu_version=version,
        problems=tuple(problems),
    )


def _local_vms(settings: Settings) -> tuple[tuple[LocalVm, ...], list[Problem]]:
    vms, problems = [], []
    for vmid, config in local_vm_configs(settings):
        if isinstance(config, AgentError):
            problems.append(Problem.of(config, vmid))
        else:
            vms.append(LocalVm(vmid, config))
    return tuple(vms), problems


def _remote_nodes(settings: Settings, vmids: set[int]) -> dict[int, str]:
    nodes = {}
    for vmid in vmids:
        found = sorted(settings.nodes_dir().glob(f"*/qemu-server/{vmid}.conf"))
        if found:
            nodes[vmid] = found[0].parent.parent.name
    return nodes


def ovs_sockets(settings: Settings) -> tuple[str, ...]:
    """Names of the socket files QEMU serves (or left) in the `ovs` socket folder."""
    return tuple(p.name for p in sockets.vm_sockets(settings.socket_dir(Backend.OVS.value)))
