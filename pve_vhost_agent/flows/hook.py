"""What the agent does when Proxmox starts and stops a VM: the hookscript's four phases.

Proxmox calls `<script> <vmid> <phase>`; only a non-zero exit of pre-start changes what
Proxmox does (it aborts the start). So pre-start checks everything the VM needs and
makes it so, or refuses; the other phases do their part and only warn.

- pre-start: the args line must already be right (Proxmox loaded the config before this
  hook and will not read it again; a migration or resume uses the main section), the
  socket folders and OVS ports must exist and ovs-vswitchd must have opened them, and an
  `external` switch must listen: QEMU blocks at its vhost-user netdev until the switch
  connects, so a missing port or server would hang the start. Room for the shared
  memory is only warned about.
- post-start: QinQ on Proxmox's tap ports (plugged while QEMU started), on Open vSwitch or
  Linux bridges (flows/lbqinq); port states logged; each link end gets its UDP socket
  (flows/links.py), also on a migration target.
- pre-stop: nothing destructive (it does not run when the guest powers off or crashes).
- post-stop: the VM's own OVS ports, S-VLAN devices and sockets go, taps get Proxmox's
  settings back.

A VM "uses the agent" when it has a spec or agent-owned args (a clone or restore copies
`args:` and `hookscript:` but not the spec): every phase then reads its config and runs,
so such a VM is never silently passed. A VM with only the agent's hookscript (no spec,
no args) has nothing to check, and stays silent; its post-stop still removes what Open
vSwitch or the socket folder holds for it (say, its spec went while it ran).

The same planners serve the service; this module only decides what to observe and when.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from pve_vhost_agent.adapters import pvefs, sockets
from pve_vhost_agent.adapters.host import read_host_memory, read_links, unix_socket_refusal
from pve_vhost_agent.adapters.journal import context_logger, setup_logging
from pve_vhost_agent.adapters.specstore import load_vm_spec
from pve_vhost_agent.errors import AgentError, AgentTimeout, ExitCode, NotFound, OvsRefused, OvsUnavailable, UsageError
from pve_vhost_agent.flows.apply import Applied, apply_plan
from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig
from pve_vhost_agent.model.actions import OVS, DelSocket
from pve_vhost_agent.model.names import is_agent_hook, vm_port_names
from pve_vhost_agent.model.notes import Note
from pve_vhost_agent.model.spec import Backend, ChainedHook, VmSpec, is_decimal
from pve_vhost_agent.plan.hook import StartView, plan_pre_start, post_start_actions, post_start_report, undo_start
from pve_vhost_agent.plan.ovs import plan_vm_removal
from pve_vhost_agent.plan.ports import port_problems
from pve_vhost_agent.plan.start import served_spec, start_config
from pve_vhost_agent.plan.tapqinq import is_uplink
from pve_vhost_agent.settings import Settings, check_node

if TYPE_CHECKING:  # python-ovs is imported only by the phases that talk to Open vSwitch
    from pve_vhost_agent.adapters.ovsdb import Ovsdb

log = logging.getLogger(__name__)

PHASES = ("pre-start", "post-start", "pre-stop", "post-stop")
EXTERNAL_CONNECT_TIMEOUT = 1.0  # seconds for an external switch to accept a probe


@dataclasses.dataclass(frozen=True)
class HookCall:
    """One call of the hookscript, as Proxmox makes it."""

    vmid: int
    phase: str
    migrated_from: str | None  # PVE_MIGRATED_FROM: the source node of a migration start

    @classmethod
    def from_argv(cls, vmid: str, phase: str, env: Mapping[str, str]) -> "HookCall":
        if not is_decimal(vmid) or int(vmid) < 1:
            raise UsageError(f"VM id {vmid!r} is not a positive integer",
                             "Proxmox calls the hookscript as `<script> <vmid> <phase>`")
        if phase not in PHASES:
            raise UsageError(f"unknown hook phase {phase!r}", f"use one of: {', '.join(PHASES)}")
        source = env.get("PVE_MIGRATED_FROM") or None
        return cls(int(vmid), phase, check_node(source, "PVE_MIGRATED_FROM") if source else None)


@dataclasses.dataclass(frozen=True)
class HookContext:
    """One phase's call, settings, VM spec, config and logger."""

    settings: Settings
    call: HookCall
    vm: VmSpec
    config: VmConfig | None  # None: the VM has no config file (where this phase looks)
    log: logging.LoggerAdapter


def read_config(settings: Settings, call: HookCall) -> VmConfig | None:
    """The VM's config as this call sees it: during a migration start, in the source's folder."""
    text = pvefs.read_text(settings.vm_conf(call.vmid, call.migrated_from))
    if text is None and call.migrated_from:
        text = pvefs.read_text(settings.vm_conf(call.vmid))
    return None if text is None else VmConfig.parse(text)


def uses_agent(vm: VmSpec, config: VmConfig | None) -> bool:
    """Does the agent have work for this VM (see the module's note)? A chained hook alone is none."""
    if vm:
        return True
    if config is None:
        return False
    main = config.section(MAIN)
    return any(_has_agent_args(values.get("args", "")) for values in (main, config.effective()))


def has_leftovers(settings: Settings, call: HookCall, config: VmConfig | None) -> bool:
    """At post-stop of a VM with the agent's hookscript but no spec or args: does Open
    vSwitch or the socket folder still hold something of the agent's for it? Silent:
    an unreachable OVS says no (the service cleans up later)."""
    if call.phase != "post-stop" or config is None or not is_agent_hook(config.section(MAIN).get("hookscript")):
        return False
    if _stale_sockets(settings, call.vmid):
        return True
    try:
        with _vm_ovsdb(settings, call.vmid) as db:
            return bool(db.snapshot().owned_ports(call.vmid))
    except AgentError:
        return False


def _has_agent_args(line: str) -> bool:
    if "vhu-" not in line:
        return False
    try:
        return bool(qemuargs.agent_args(line))
    except AgentError:
        return True  # malformed around the agent's words: pre-start reports it


def run_hook(settings: Settings, vmid: str, phase: str, env: Mapping[str, str]) -> int:
    """One call of the hookscript, as Proxmox makes it: the exit code (pre-start's non-zero
    aborts the start). Errors are said once, in one line; the VM's previous hookscript runs
    after the agent's work, and a pre-start it fails is undone."""
    call = HookCall.from_argv(vmid, phase, env)
    vm = load_vm_spec(settings, call.vmid)
    config = read_config(settings, call)
    # Also without a spec: a clone's copied args, or what a VM left whose spec went.
    ours = uses_agent(vm, config) or has_leftovers(settings, call, config)
    if not ours and vm.chained_hook is None:
        return ExitCode.OK  # not the agent's VM: silent, as Proxmox's task log should be
    if ours:
        setup_logging(journal=True, human_stream=sys.stdout)
        try:
            run_phase(settings, call, vm, config)
        except AgentError as err:
            fields = {"vmid": call.vmid, "phase": call.phase, "result": "failed"}
            if call.phase == "pre-start":
                log.error("start aborted: %s", err, extra=fields)
                return err.exit_code
            # Only pre-start can change what Proxmox does; later phases warn, and what is
            # left behind is the service's to clean up.
            log.warning("%s: %s", call.phase, err, extra=fields)
    if vm.chained_hook is None:
        return ExitCode.OK
    undo = call.phase == "pre-start" and bool(vm)  # the agent's pre-start ran: a failed chained one is undone
    try:
        chained, why = run_chained(settings, vm.chained_hook, call, env), ""
    except AgentError as err:
        if not undo:
            raise
        chained, why = int(err.exit_code), f": {err}"
    if chained != 0 and undo:
        log.error("start aborted by the chained hookscript %s%s; undoing this pre-start",
                  vm.chained_hook.hookscript, why, extra={"vmid": call.vmid, "phase": call.phase})
        roll_back(settings, call, vm, config)
    return chained


def run_phase(settings: Settings, call: HookCall, vm: VmSpec, config: VmConfig | None) -> None:
    """The agent's own work for `call` (raises AgentError; pre-start's abort the start)."""
    ctx = HookContext(settings, call, vm, config, context_logger(log, vmid=call.vmid, phase=call.phase))
    _PHASES[call.phase](ctx)


def roll_back(settings: Settings, call: HookCall, vm: VmSpec, config: VmConfig | None) -> None:
    """Undo a pre-start whose start is aborted after it (no other hook will run); what
    cannot be undone now is left to the service, with a warning."""
    if not vm.ovs_nics:
        return
    try:
        run_phase(settings, dataclasses.replace(call, phase="post-stop"), vm, config)
    except AgentError as err:
        log.warning("the ports of the aborted start were not all removed: %s; the service removes them", err,
                    extra={"vmid": call.vmid, "phase": call.phase, "result": "failed"})


def run_chained(settings: Settings, hook: ChainedHook, call: HookCall, env: Mapping[str, str]) -> int:
    """Run the VM's previous hookscript as Proxmox would: same argv, environment, stdin."""
    fix = (f"restore it, or drop it: pve-vhost-agent disable {call.vmid}, qm set {call.vmid} --delete hookscript, "
           f"pve-vhost-agent enable {call.vmid}")
    import subprocess  # only a VM that chains a hookscript runs one

    from pve_vhost_agent.adapters import storage

    path = storage.runnable_snippet(settings, hook.hookscript, "chained hookscript", fix)

    try:
        result = subprocess.run([str(path), str(call.vmid), call.phase], env=dict(env), check=False)
    except OSError as err:  # e.g. no `#!` line: ENOEXEC
        raise AgentError(f"chained hookscript {hook.hookscript} ({path}) cannot be run: {err.strerror}",
                         f"give it a `#!` line or fix it; {fix}") from err
    if result.returncode != 0:
        log.warning("chained hookscript %s exited with %d", hook.hookscript, result.returncode,
                    extra={"vmid": call.vmid, "phase": call.phase, "action": "RunChainedHook",
                           "result": f"exit {result.returncode}"})
    return result.returncode


# --- phases: observe, plan, apply ---------------------------------------------------------


def _pre_start(ctx: HookContext) -> None:
    settings, vm = ctx.settings, ctx.vm
    config = _config_at_start(ctx)
    netdevs, ovs_part = None, vm
    if vm.tap_qinq:
        from pve_vhost_agent.flows import lbqinq  # netlink: only QinQ taps may be on a Linux bridge

        netdevs = lbqinq.start_links(vm)
        ovs_part = lbqinq.ovs_part(vm, start_config(config, ctx.call.migrated_from).values, netdevs)
    needs_ovs = bool(ovs_part.tap_qinq or vm.ovs_nics)
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(_vm_ovsdb(settings, vm.vmid)) if needs_ovs else None
        plan = plan_pre_start(dataclasses.replace(_observe_start(settings, ctx.call, vm, config, db), netdevs=netdevs))
        _say(ctx, plan.notes, plan.warnings)
        if plan.ports and not any(a.target == OVS for a in plan.actions):
            ctx.log.info("Open vSwitch already as planned", extra={"result": "unchanged"})
        applied = Applied()
        try:
            apply_plan(settings, plan.actions, ctx.log, db=db, applied=applied)
            if plan.ports:
                _await_ports_open(ctx, db, plan.served)
        except AgentError:
            _undo_start(ctx, db, applied)
            raise


def _observe_start(settings: Settings, call: HookCall, vm: VmSpec, config: VmConfig, db: Ovsdb | None) -> StartView:
    """Everything pre-start decides on, read once: what the VM does not need is not read."""
    view = StartView(vm, config, call.migrated_from, settings.socket_dirs())
    if vm.links:
        view = dataclasses.replace(view, links=_link_facts(settings, vm))
    if db is not None:
        try:
            view = dataclasses.replace(view, ovs=db.snapshot())
        except OvsUnavailable as err:  # the plan says it, after the checks that need no OVS
            view = dataclasses.replace(view, ovs_error=err)
    if not vm.nics:
        return view
    backends = {nic.backend for nic in vm.nics}
    return dataclasses.replace(
        view,
        qemu_version=_qemu_version(settings),
        memory=read_host_memory(),
        folders={b: sockets.folder(settings.socket_dir(b.value)) for b in backends},
        external={nic.index: unix_socket_refusal(Path(nic.socket_path(settings.socket_dirs())),  # as QEMU sees it
                                                 EXTERNAL_CONNECT_TIMEOUT)
                  for nic in vm.nics if nic.backend is Backend.EXTERNAL},
    )


def _link_facts(settings: Settings, vm: VmSpec):
    """Where the link ends' peers are; None (the start goes on, it only says less) when
    that cannot be read: a start needs nothing from its peers."""
    from pve_vhost_agent.flows import links as vm_links  # only a VM with link ends needs them

    try:
        return vm_links.facts_for(settings, vm.links)
    except AgentError as err:
        log.warning("link ends not checked: %s", err, extra={"vmid": vm.vmid, "result": "failed"})
        return None


def _qemu_version(settings: Settings) -> tuple[int, int, int]:
    from pve_vhost_agent.adapters import qemu  # runs QEMU (subprocess) only when the cache has no answer

    return qemu.installed_version(cache_dir=settings.run_dir)


def _undo_start(ctx: HookContext, db: Ovsdb | None, applied: Applied) -> None:
    """A start that is aborted leaves no port behind (no other hook will run for it)."""
    undo = undo_start(tuple(applied.done))
    if not undo:
        return
    try:
        # Committed is enough: ovs-vswitchd, which may be what failed, catches up by itself.
        apply_plan(ctx.settings, undo, ctx.log, db=db, wait=False)
    except AgentError as err:
        ctx.log.warning("the ports of the aborted start were not all removed: %s; the service removes them",
                        err, extra={"result": "failed"})


def _post_start(ctx: HookContext) -> None:
    start = start_config(ctx.config, ctx.call.migrated_from) if ctx.config else None
    vm = served_spec(ctx.vm, start) if start else ctx.vm
    if vm.tap_qinq:
        from pve_vhost_agent.flows import lbqinq  # netlink: only QinQ taps may be on a Linux bridge

        vm = lbqinq.post_start(ctx.settings, vm, start.values if start else {}, ctx.log)
    if vm.links:
        from pve_vhost_agent.flows import links as vm_links  # only a VM with link ends needs QMP

        try:  # Proxmox holds the VM's lock while its hooks run: no guard needed here
            vm_links.connect_ends(ctx.settings, vm.vmid, vm.links, ctx.log)
        except AgentError as err:  # the VM runs; the service connects its ends on its next pass
            ctx.log.warning("link ends not connected: %s; the service tries again", err, extra={"result": "failed"})
    if not vm.tap_qinq and not vm.ovs_nics:
        return
    links = _tap_links(ctx) if vm.tap_qinq else None
    uplinks = [name for name, link in (links or {}).items() if is_uplink(link)]
    with _vm_ovsdb(ctx.settings, vm.vmid, uplinks) as db:
        actions = post_start_actions(vm, db.snapshot())
        if vm.tap_qinq and not actions:
            ctx.log.info("Open vSwitch already as planned", extra={"result": "unchanged"})
        apply_plan(ctx.settings, actions, ctx.log, db=db)
        notes, warnings = post_start_report(vm, db.snapshot(), links)
    _say(ctx, notes, warnings)


def _pre_stop(ctx: HookContext) -> None:
    ctx.log.info("stopping: the agent removes its ports and sockets after the stop", extra={"result": "ok"})


def _post_stop(ctx: HookContext) -> None:
    vmid, settings = ctx.call.vmid, ctx.settings
    running = ctx.config.section(MAIN) if ctx.config else {}
    rest = ctx.vm
    if rest.tap_qinq:
        from pve_vhost_agent.flows import lbqinq  # netlink: only QinQ taps may be on a Linux bridge

        rest = lbqinq.post_stop(settings, ctx.vm, running, ctx.log)
    # A VM all of whose QinQ is on Linux bridges leaves Open vSwitch alone (the host may
    # have none); anything else of the agent's there is the service's to clean up.
    if not ctx.vm or rest:
        try:
            with _vm_ovsdb(settings, vmid) as db:
                removal = plan_vm_removal(vmid, db.snapshot())
                if not removal:
                    ctx.log.info("Open vSwitch already as planned", extra={"result": "unchanged"})
                apply_plan(settings, removal, ctx.log, db=db)
        except OvsUnavailable as err:
            if ctx.vm and not (rest.ovs_nics or rest.tap_qinq):  # link ends, external NICs: no OVS needed
                ctx.log.info("Open vSwitch not checked for leftovers (%s); the VM has nothing there", err,
                             extra={"result": "unchanged"})
            else:
                raise
    # QEMU (the server of `ovs` sockets) is gone; a socket file it left is stale. The
    # `external` folder belongs to the external switch: never touched.
    apply_plan(settings, tuple(DelSocket(vmid, str(sock)) for sock in _stale_sockets(settings, vmid)), ctx.log)


_PHASES: dict[str, Callable[[HookContext], None]] = {
    "pre-start": _pre_start,
    "post-start": _post_start,
    "pre-stop": _pre_stop,
    "post-stop": _post_stop,
}


# --- helpers --------------------------------------------------------------------------


def _say(ctx: HookContext, notes: Iterable[Note], warnings: Iterable[Note]) -> None:
    for note in notes:
        ctx.log.info("%s", note.text, extra={"fields": {**note.fields(), "result": "ok"}})
    for note in warnings:
        ctx.log.warning("%s", note.text, extra={"fields": {**note.fields(), "result": "warning"}})


def _vm_ovsdb(settings: Settings, vmid: int, more_ports: Iterable[str] = ()) -> Ovsdb:
    """A connection that sees only this VM's ports (and `more_ports`): a hook's cost must
    not grow with the switch."""
    from pve_vhost_agent.adapters.ovsdb import Ovsdb  # noqa: F811 - only phases that need it load python-ovs

    return Ovsdb.from_settings(settings, ports=(*vm_port_names(vmid), *more_ports))


def _tap_links(ctx: HookContext):
    try:
        return read_links()
    except AgentError as err:  # a check that cannot run is a warning, not a failed post-start
        ctx.log.warning("tap links not checked: %s", err, extra={"result": "failed"})
        return None


def _config_at_start(ctx: HookContext) -> VmConfig:
    """The config this start uses: during a migration it still sits in the source's folder."""
    if ctx.config is None:
        path = ctx.settings.vm_conf(ctx.vm.vmid, ctx.call.migrated_from)
        raise NotFound(f"VM {ctx.vm.vmid} has a spec but no config at {path}",
                       f"remove the stale spec (pve-vhost-agent nic list {ctx.vm.vmid}) or restore the VM")
    return ctx.config


def _stale_sockets(settings: Settings, vmid: int) -> list:
    """The VM's `ovs` socket files (QEMU, their server, must be gone when this is asked)."""
    return sockets.vm_sockets(settings.socket_dir(Backend.OVS.value), vmid)


def _await_ports_open(ctx: HookContext, db: Ovsdb, vm: VmSpec) -> None:
    """Wait (bounded) until ovs-vswitchd reports on each port; refuse one it could not open."""
    deadline = time.monotonic() + ctx.settings.ovs_timeout
    while True:
        state = db.snapshot()
        seqno = db.change_seqno
        problems, waiting = port_problems(vm, state)
        if problems:
            raise OvsRefused(problems[0], "fix what ovs-vswitchd says (ovs-vsctl list Interface; "
                             "/var/log/openvswitch/ovs-vswitchd.log), then start the VM again")
        remaining = deadline - time.monotonic()
        if not waiting:
            ctx.log.info("ovs-vswitchd opened %s", ", ".join(nic.port_name for nic in vm.ovs_nics),
                         extra={"result": "ok"})
            return
        if remaining <= 0:
            raise AgentTimeout(f"VM {vm.vmid}: ovs-vswitchd has not opened {', '.join(waiting)} "
                               f"within {ctx.settings.ovs_timeout:g} s", "is ovs-vswitchd running and not stuck?")
        db.wait_for_change(seqno, remaining)
