"""`link add|remove|list`, and connecting a running VM's link ends (post-start, service).

Declaring: both ends are written together, each into its own VM's file, under the
cluster lock (a hook reads only its VM's file, and finds its peer's port there too).
Then each VM on this node with the agent's hookscript gets its args at once (as a
pending change when it runs; a running QEMU gets a new link end only at its next start,
a removed one is disconnected at once); a VM on another node gets them from that node's
service (or `pve-vhost-agent apply VMID` there).

Connecting: a running end's socket is made here and handed to QEMU over QMP (see
adapters/links.py); plan/links.py says where it must point.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Sequence

from pve_vhost_agent.adapters import links as qemu_links
from pve_vhost_agent.adapters.specstore import SpecUpdate, load_spec, update_spec
from pve_vhost_agent.adapters.vmstore import VmLocation, find_vm, vm_running
from pve_vhost_agent.errors import AgentError, NotFound, UsageError
from pve_vhost_agent.flows.apply import Applied, apply_plan
from pve_vhost_agent.flows.declare import random_macs
from pve_vhost_agent.flows.vmargs import VmArgs, apply_vm_args, sync_for, vm_args
from pve_vhost_agent.formats.vmconfig import MAIN
from pve_vhost_agent.model import names, spec
from pve_vhost_agent.model.links import LinkFacts
from pve_vhost_agent.plan import links as plan
from pve_vhost_agent.settings import Settings

log = logging.getLogger(__name__)


def parse_end(text: str) -> tuple[int, int]:
    end = names.parse_end_name(text)
    if end is None:
        raise UsageError(f"{text[:40]!r} is not a link end", "write it as VMID:netN, e.g. 100:net2")
    spec.check_vmid(end[0])
    return end


# --- declaring --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinkChange:
    """What `link add|remove` did: the spec before and after, and what followed per VM."""

    ends: tuple[tuple[int, int], ...]
    update: SpecUpdate
    dry_run: bool
    args: tuple[VmArgs, ...] = ()
    lines: tuple[str, ...] = ()

    @property
    def entries(self) -> tuple[spec.LinkEnd, ...]:
        """The ends as declared now (add) or as they were (remove)."""
        cluster = self.update.after if self.update.after.entry(*self.ends[0]) else self.update.before
        found = (cluster.entry(*end) for end in self.ends)
        return tuple(e for e in found if isinstance(e, spec.LinkEnd))


def add(settings: Settings, first: str, second: str, mtu: int | None, macs: Sequence[str],
        dry_run: bool) -> LinkChange:
    a, b = parse_end(first), parse_end(second)
    if len(macs) > 2:
        raise UsageError(f"{len(macs)} MACs given for the two ends of a link", "give --mac at most twice")
    locations = {vmid: find_vm(settings, vmid) for vmid in {a[0], b[0]}}
    configs = {vmid: location.config for vmid, location in locations.items()}
    mtu = default_mtu(settings) if mtu is None else mtu
    candidates = random_macs(settings)

    def change(cluster: spec.ClusterSpec) -> spec.ClusterSpec:
        after = plan.add_link(cluster, a, b, configs, mtu, macs, candidates)
        _check_args(settings, after, locations.values())
        return after

    return _declare(settings, (a, b), change, dry_run, locations.values())


def remove(settings: Settings, end_text: str, dry_run: bool) -> LinkChange:
    """Remove the link `end_text` is an end of (the VMs need not exist any more)."""
    end = parse_end(end_text)
    before = load_spec(settings).entry(*end)
    ends = (end, before.peer) if isinstance(before, spec.LinkEnd) else (end,)
    locations = []
    for vmid in {e[0] for e in ends}:
        try:
            locations.append(find_vm(settings, vmid))
        except NotFound:
            pass
    return _declare(settings, ends, lambda cluster: plan.remove_link(cluster, end), dry_run, locations)


def default_mtu(settings: Settings) -> int:
    """What a 1500-byte underlay carries whole: 1458 (IPv4 cluster) or 1438 (IPv6)."""
    addresses = qemu_links.cluster_addresses(settings)
    version = 6 if any(plan.family(address) == 6 for address in addresses.values()) else 4
    return spec.LINK_MTU_DEFAULT[version]


def _check_args(settings: Settings, cluster: spec.ClusterSpec, locations: Iterable[VmLocation]) -> None:
    """A link a VM with the agent's hookscript could not start with is not written."""
    for location in locations:
        if _enabled(location):
            sync_for(settings, cluster.for_vm(location.vmid), location.config, bool(location.running))


def _declare(settings: Settings, ends: tuple[tuple[int, int], ...], change, dry_run: bool,
             locations: Iterable[VmLocation]) -> LinkChange:
    if dry_run:
        before = load_spec(settings)
        update = SpecUpdate(before, change(before))
    else:
        update = update_spec(settings, change)
    result = LinkChange(ends, update, dry_run)
    if not update.changed:
        return result
    args, lines = [], []
    for location in sorted(locations, key=lambda loc: loc.vmid):
        if not _enabled(location) and not update.after.for_vm(location.vmid).links:
            continue  # nothing of the agent's to write, nothing to enable for
        vm_result, vm_lines = _follow(settings, location, update, dry_run)
        args += [vm_result] if vm_result else []
        lines += vm_lines
    return dataclasses.replace(result, args=tuple(args), lines=tuple(lines))


def _follow(settings: Settings, location: VmLocation, update: SpecUpdate,
            dry_run: bool) -> tuple[VmArgs | None, list[str]]:
    """One VM after the change: its args, and its running QEMU's link sockets."""
    vmid = location.vmid
    if not _enabled(location):
        return None, [] if dry_run else [f"next: `pve-vhost-agent enable {vmid}` sets the hookscript and writes "
                                         "the args line"]
    if not location.local:
        return None, [f"VM {vmid} is on node {location.node}: its service there writes its args line (or run "
                      f"`pve-vhost-agent apply {vmid}` on {location.node})"]
    result = vm_args(settings, vmid, update.after) if dry_run else apply_vm_args(settings, vmid, update.after)
    lines = []
    if location.running and not dry_run:
        ends = update.after.for_vm(vmid).links
        try:
            applied = connect_ends(settings, vmid, ends, log, guarded=True, say_waiting=False)
            lines += [f"VM {vmid}: {action.sentence()} (running VM, at once)" for action in applied.done]
        except AgentError as err:
            lines.append(f"VM {vmid}: its running link sockets were not changed ({err}); the service does it")
        new = {e.index for e in ends} - {e.index for e in update.before.for_vm(vmid).links}
        lines += [f"VM {vmid} is running: link end {names.nic_name(index)} comes with its next start"
                  for index in sorted(new)]
    return result, lines


def _enabled(location: VmLocation) -> bool:
    return names.is_agent_hook(location.config.section(MAIN).get("hookscript"))


# --- connecting a running VM's ends -----------------------------------------------------


def facts_for(settings: Settings, ends: Sequence[spec.LinkEnd]) -> LinkFacts:
    return qemu_links.facts(settings, [end.peer[0] for end in ends])


def connect_ends(settings: Settings, vmid: int, ends: Sequence[spec.LinkEnd], logger, *, guarded: bool = False,
                 say_waiting: bool = True) -> Applied:
    """Give running VM `vmid`'s link ends the sockets they need (and take away those of
    removed links). `guarded`: under Proxmox's VM lock, while the VM still runs (a hook
    runs under that lock already)."""
    if not ends and not guarded:
        return Applied()
    facts = facts_for(settings, ends)
    decided = plan.plan_link_sockets(vmid, ends, plan.wanted_sockets(ends, facts), qemu_links.observe(settings, vmid))
    for line in decided.dark + (decided.waiting if say_waiting else ()):
        logger.warning("%s", line, extra={"vmid": vmid, "result": "warning"})
    return apply_plan(settings, decided.actions, logger, guards={vmid: True} if guarded else None)


# --- listing ---------------------------------------------------------------------------


def rows(settings: Settings) -> tuple[list[dict], tuple[str, ...]]:
    """Each link (both ends, where they are, what this node's QEMU has) and the problems."""
    cluster = load_spec(settings)
    ends = {end.key: end for end in cluster.links}
    facts = qemu_links.facts(settings, {end.vmid for end in cluster.links}) if cluster.links else None
    found = []
    for key in sorted({end.link_key for end in cluster.links}):
        sides = [ends[k] for k in key if k in ends]
        found.append({"link": " - ".join(names.end_name(*k) for k in key), "mtu": sides[0].mtu,
                      "ends": [_end_row(settings, end, facts) for end in sides]})
    return found, cluster.link_problems()


def _end_row(settings: Settings, end: spec.LinkEnd, facts: LinkFacts) -> dict:
    node = facts.nodes.get(end.vmid)
    row = {"end": end.end, "vmid": end.vmid, "nic": end.name, "peer": end.peer_end, "mac": end.mac,
           "port": end.port, "peer_port": end.peer_port, "node": node, "running": None, "socket": None,
           "state": f"on node {node}" if node else "no VM config on any node"}
    if node != settings.node:
        return row
    row["running"] = vm_running(settings, end.vmid)
    if not row["running"]:
        row["state"] = "stopped (dark)"
        return row
    try:
        running = qemu_links.observe(settings, end.vmid)
    except AgentError as err:
        row["state"] = f"running; its QEMU did not say: {err.problem}"
        return row
    sockets = [s for s in running.attached if s.index == end.index]
    want = plan.end_socket(end, facts.here, facts.nodes.get(end.peer[0]), facts.addresses)
    if end.index not in running.devices:
        row["state"] = "running without this end: it comes with the VM's next start"
    elif len(sockets) == 1:
        row["socket"] = {"local": list(sockets[0].local), "remote": list(sockets[0].remote)}
        ok = isinstance(want, plan.EndSocket) and (sockets[0].local, sockets[0].remote) == (want.local, want.remote)
        row["state"] = "connected" if ok else "connected to an old address: the service re-points it"
    else:
        row["state"] = "running, no socket yet: the service connects it"
    return row
