"""Observing this node for the service and `status`: files, locks, OVS, QEMU. Reads only.

The order matters where a VM may be starting: its lock is probed before its pidfile, so
a start that begins in between shows as "not running" and the service's apply step,
which re-checks under the VM's lock, leaves it alone. Files come before Open vSwitch:
what they declare says which rows of the switch the service replicates (`ovs_scope`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from pve_vhost_agent.adapters import pvefs, qemu, sockets
from pve_vhost_agent.adapters.linkstate import read_link_state
from pve_vhost_agent.adapters.ovsdb import UNREACHABLE_FIX, Ovsdb, Scope
from pve_vhost_agent.adapters.specstore import load_spec
from pve_vhost_agent.adapters.vmstore import held_vm_locks, local_vm_configs, vm_running
from pve_vhost_agent.errors import AgentError, OvsUnavailable
from pve_vhost_agent.formats.vmconfig import MAIN
from pve_vhost_agent.model.links import LinkFacts, RunningLinks
from pve_vhost_agent.model.names import socket_vmid
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.model.spec import Backend, ClusterSpec
from pve_vhost_agent.plan.links import has_link_devices
from pve_vhost_agent.plan.observed import CLUSTER_FS_PROBLEM, OVSDB_PROBLEM, LocalVm, NodeState, Problem
from pve_vhost_agent.settings import Settings

# How the service reads Open vSwitch: given the scope, a snapshot or why there is none.
OvsReader = Callable[[Scope], "tuple[OvsState | None, Problem | None]"]


@dataclasses.dataclass
class Caches:
    """What one pass keeps for the next: parsed files that did not change."""

    specs: pvefs.ParsedFiles = dataclasses.field(default_factory=pvefs.ParsedFiles)
    configs: pvefs.ParsedFiles = dataclasses.field(default_factory=pvefs.ParsedFiles)


def observe_ovs(db: Ovsdb, scope: Scope) -> tuple[OvsState | None, Problem | None]:
    """A current snapshot of `scope`, or why there is none (the caller closes `db` then)."""
    try:
        db.watch(scope)
        state = db.snapshot()
        if not db.live():
            raise OvsUnavailable(f"lost the connection to OVSDB at {db.remote}", UNREACHABLE_FIX)
        return state, None
    except AgentError as err:
        return None, Problem.of(err, key=OVSDB_PROBLEM)


def ovs_scope(spec: ClusterSpec | None, vms: tuple[LocalVm, ...]) -> Scope:
    """The rows the service needs: every row the agent marked as its own (leftovers of any
    VM), and the declared ports of this node's enabled VMs (a port gone, a tap re-plugged
    without the agent's marks)."""
    names = set()
    for vm in vms:
        if spec is not None and vm.enabled:
            declared = spec.for_vm(vm.vmid)
            names.update(nic.port_name for nic in declared.nics)
            names.update(tap.port_name for tap in declared.tap_qinq)
    return Scope(frozenset(names), owned=True, bridge_ports=True)


def observe_node(settings: Settings, read_ovs: OvsReader, caches: Caches | None = None,
                 remember: bool = True) -> NodeState:
    """This node as the service plans for it; `remember=False` (status, dry runs) writes nothing."""
    caches = caches or Caches()
    problems = []
    spec: ClusterSpec | None
    cluster_fs = pvefs.cluster_fs(settings.pve_dir)
    fs_error = pvefs.cluster_fs_error(settings.pve_dir) if cluster_fs != pvefs.MOUNTED else None
    if fs_error is not None:
        problems.append(Problem.of(fs_error, key=CLUSTER_FS_PROBLEM))
    if cluster_fs == pvefs.NOT_MOUNTED:  # an empty folder: no VM, no spec can be known
        spec, vms = None, ()
    else:
        try:
            spec = load_spec(settings, caches.specs)
        except AgentError as err:
            spec, problems = None, problems + [Problem.of(err)]
        vms, unreadable = _local_vms(settings, caches)
        problems += unreadable
    ovs, ovs_problem = read_ovs(ovs_scope(spec, vms))
    problems = ([ovs_problem] if ovs_problem else []) + problems
    socket_names = ovs_sockets(settings)
    owned = {p.vmid for p in ovs.owned_ports() if p.vmid is not None} if ovs else set()
    local = {vm.vmid for vm in vms}
    busy, running = set(), set()
    try:
        held = held_vm_locks(settings)
    except AgentError as err:
        held, problems = None, problems + [Problem.of(err)]
    for vmid in sorted(local | owned | {socket_vmid(s) for s in socket_names}):
        # Before the pidfile (see the module's doc); a lock that cannot be read: never touch it.
        if held is None or held(vmid):
            busy.add(vmid)
        if vm_running(settings, vmid):
            running.add(vmid)
    netdevs = None
    try:  # every pass: a leftover S-VLAN bridge is found by its mark, whatever is declared
        netdevs = read_link_state(tap.port_name for vm in vms if vm.enabled and spec is not None
                                  for tap in spec.for_vm(vm.vmid).tap_qinq)
    except AgentError as err:
        problems.append(Problem.of(err))
    links, link_facts, link_problems = _observe_links(settings, spec, vms, running, busy)
    problems += link_problems
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
        ovs_sockets=socket_names,
        socket_dirs=settings.socket_dirs(),
        qemu_version=version,
        problems=tuple(problems),
        cluster_fs=cluster_fs,
        netdevs=netdevs,
        links=links,
        link_facts=link_facts,
    )


def _observe_links(settings: Settings, spec: ClusterSpec | None, vms: tuple[LocalVm, ...], running: set[int],
                   busy: set[int]) -> tuple[dict[int, RunningLinks], LinkFacts | None, list[Problem]]:
    """The link ends of this node's running enabled VMs, as their QEMU has them (asked over
    QMP; never a busy VM's: Proxmox may be talking to it), and where their peers are."""
    if spec is None:
        return {}, None, []
    wanted = [vm for vm in vms if vm.enabled and vm.vmid in running and vm.vmid not in busy
              and (spec.for_vm(vm.vmid).links or has_link_devices(vm.config.section(MAIN).get("args", "")))]
    if not wanted:
        return {}, None, []
    from pve_vhost_agent.adapters import links  # QMP, only for VMs with link ends

    found, problems = {}, []
    for vm in wanted:
        try:
            found[vm.vmid] = links.observe(settings, vm.vmid)
        except AgentError as err:
            problems.append(Problem.of(err, vm.vmid))
    try:
        peers = {end.peer[0] for vm in wanted for end in spec.for_vm(vm.vmid).links}
        return found, links.facts(settings, peers), problems
    except AgentError as err:
        return found, None, problems + [Problem.of(err)]


def _local_vms(settings: Settings, caches: Caches) -> tuple[tuple[LocalVm, ...], list[Problem]]:
    vms, problems = [], []
    for vmid, config in local_vm_configs(settings, caches.configs):
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
