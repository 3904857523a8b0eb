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
- post-start: QinQ on Proxmox's tap ports (plugged while QEMU started); port states logged.
- pre-stop: nothing destructive (it does not run when the guest powers off or crashes).
- post-stop: the VM's own OVS ports and sockets go, taps get Proxmox's settings back.

A VM "uses the agent" when it has a spec or agent-owned args (a clone or restore copies
`args:` and `hookscript:` but not the spec): every phase then reads its config and runs,
so such a VM is never silently passed. A VM with only the agent's hookscript (no spec,
no args) has nothing to check, and stays silent; its post-stop still removes what Open
vSwitch or the socket folder holds for it (say, its spec went while it ran).

The same planners serve the service; this module only decides what to observe and when.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
from typing import Callable, Mapping

from pve_vhost_agent.plan import ovs as ovsplan
from pve_vhost_agent.adapters import pvefs
from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.adapters import storage as storagecfg
from pve_vhost_agent.flows import tapguard
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.plan.capacity import capacity_warnings, shared_memory_need
from pve_vhost_agent.errors import AgentError, AgentTimeout, ConfigConflict, NotFound, OvsRefused, UsageError
from pve_vhost_agent.adapters.host import read_host_memory, unix_socket_refusal
from pve_vhost_agent.adapters.journal import context_logger, timed_action
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ports import port_problems
from pve_vhost_agent.model.names import is_agent_hook, socket_vmid
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import Backend, ChainedHook, VmSpec
from pve_vhost_agent.plan.start import served_spec, stale_args, start_config
from pve_vhost_agent.flows.vmargs import qemu_version_for, socket_dirs
from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig
from pve_vhost_agent.formats.vmlayout import memory_layout

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
        if not vmid.isdigit() or int(vmid) < 1:
            raise UsageError(f"VM id {vmid!r} is not a positive integer",
                             "Proxmox calls the hookscript as `<script> <vmid> <phase>`")
        if phase not in PHASES:
            raise UsageError(f"unknown hook phase {phase!r}", f"use one of: {', '.join(PHASES)}")
        return cls(int(vmid), phase, env.get("PVE_MIGRATED_FROM") or None)


@dataclasses.dataclass(frozen=True)
class HookContext:
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
        with Ovsdb.from_settings(settings) as db:
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


def run_phase(settings: Settings, call: HookCall, vm: VmSpec, config: VmConfig | None) -> None:
    """The agent's own work for `call` (raises AgentError; pre-start's abort the start)."""
    ctx = HookContext(settings, call, vm, config, context_logger(log, vmid=call.vmid, phase=call.phase))
    _PHASES[call.phase](ctx)


def roll_back(settings: Settings, call: HookCall, vm: VmSpec, config: VmConfig | None) -> None:
    """Undo a pre-start whose start is aborted after it (no other hook will run)."""
    if any(nic.backend is Backend.OVS for nic in vm.nics):
        run_phase(settings, dataclasses.replace(call, phase="post-stop"), vm, config)


def run_chained(settings: Settings, hook: ChainedHook, call: HookCall, env: Mapping[str, str]) -> int:
    """Run the VM's previous hookscript as Proxmox would: same argv, environment, stdin."""
    path = storagecfg.snippet_path(settings, hook.hookscript)
    fix = f"restore it, or drop it: pve-vhost-agent disable {call.vmid} && pve-vhost-agent enable {call.vmid}"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise NotFound(f"chained hookscript {hook.hookscript} ({path}) is missing or not executable", fix)
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


# --- phases ---------------------------------------------------------------------------


def _pre_start(ctx: HookContext) -> None:
    settings = ctx.settings
    config = _config_at_start(ctx)
    start = start_config(config, ctx.call.migrated_from)
    with timed_action(ctx.log, "CheckArgs", f"VM {ctx.vm.vmid}: check the args line"):
        vm = served_spec(ctx.vm, start)  # on a migration or resume: the NICs it runs with
        plan = plan_args(vm, start.values, qemu_version_for(vm), socket_dirs(settings))
        stale = stale_args(vm, qemuargs.agent_args(start.values.get("args", "")), plan.args, start)
        if stale:
            raise stale
    tapguard.check_taps_before_start(settings, vm, start.values, ctx.log)
    if vm.nics:
        with timed_action(ctx.log, "CheckMemory", f"VM {vm.vmid}: check room for shared memory"):
            need = shared_memory_need(memory_layout(start.values))
            for warning in capacity_warnings(vm.vmid, need, read_host_memory()):
                ctx.log.warning("%s", warning, extra={"action": "CheckMemory", "result": "short"})
        for backend in sorted({nic.backend for nic in vm.nics}, key=lambda b: b.value):
            _make_folder(settings, backend)
        _check_external_servers(ctx, vm)
    if any(nic.backend is Backend.OVS for nic in vm.nics):
        with Ovsdb.from_settings(settings) as db:
            _apply(ctx, db, lambda state: ovsplan.plan_vhost_ports(vm, state, settings.socket_dir(Backend.OVS.value)))
            _check_ports_open(ctx, db, vm)


def _post_start(ctx: HookContext) -> None:
    vm = served_spec(ctx.vm, start_config(ctx.config, ctx.call.migrated_from)) if ctx.config else ctx.vm
    if not vm.tap_qinq and not any(nic.backend is Backend.OVS for nic in vm.nics):
        return
    with Ovsdb.from_settings(ctx.settings) as db:
        if vm.tap_qinq:
            _apply(ctx, db, lambda state: ovsplan.plan_tap_qinq(vm, state))
        state = db.snapshot()
        tapguard.warn_tap_links(vm, state, ctx.log)
        for nic in vm.nics:
            port = state.port(nic.port_name)
            iface = port.interface if port else None
            if nic.backend is not Backend.OVS:
                continue
            if iface is None:
                ctx.log.warning("VM %s %s: OVS has no port %s", vm.vmid, nic.name, nic.port_name,
                                extra={"nic": nic.name, "port": nic.port_name, "result": "missing"})
                continue
            # OVS says `connected` only once the guest's driver runs: report, do not wait.
            status = ", ".join(f"{k}={v}" for k, v in sorted(iface.status.items()) if k in ("mode", "status"))
            ctx.log.info("VM %s %s: port %s on %s: %s", vm.vmid, nic.name, nic.port_name, port.bridge,
                         status or "no status yet",
                         extra={"nic": nic.name, "port": nic.port_name, "bridge": port.bridge,
                                "action": "CheckPort", "result": iface.status.get("status", "unknown")})


def _pre_stop(ctx: HookContext) -> None:
    ctx.log.info("VM %s: stopping; ports and sockets are removed after the stop", ctx.vm.vmid,
                 extra={"action": "None", "result": "ok"})


def _post_stop(ctx: HookContext) -> None:
    vmid, settings = ctx.call.vmid, ctx.settings
    with Ovsdb.from_settings(settings) as db:
        _apply(ctx, db, lambda state: ovsplan.plan_vm_removal(vmid, state))
    # QEMU (the server of `ovs` sockets) is gone; a socket file it left is stale. The
    # `external` folder belongs to the external switch: never touched.
    for sock in _stale_sockets(settings, vmid):
        try:
            sock.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise AgentError(f"cannot remove the stale socket {sock}: {err.strerror}",
                             "remove it by hand before the next start") from err
        ctx.log.info("VM %s: removed stale socket %s", vmid, sock, extra={"action": "DelSocket", "result": "removed"})


_PHASES: dict[str, Callable[[HookContext], None]] = {
    "pre-start": _pre_start,
    "post-start": _post_start,
    "pre-stop": _pre_stop,
    "post-stop": _post_stop,
}


# --- helpers --------------------------------------------------------------------------


def _config_at_start(ctx: HookContext) -> VmConfig:
    """The config this start uses: during a migration it still sits in the source's folder."""
    if ctx.config is None:
        path = ctx.settings.vm_conf(ctx.vm.vmid, ctx.call.migrated_from)
        raise NotFound(f"VM {ctx.vm.vmid} has a spec but no config at {path}",
                       f"remove the stale spec (pve-vhost-agent nic list {ctx.vm.vmid}) or restore the VM")
    return ctx.config


def _stale_sockets(settings: Settings, vmid: int) -> list:
    """The VM's `ovs` socket files (QEMU, their server, must be gone when this is asked)."""
    folder = settings.socket_dir(Backend.OVS.value)
    return [sock for sock in sorted(folder.glob(f"vm-{vmid}-*.sock"))
            if socket_vmid(sock.name) == vmid and sock.is_socket()]


def _make_folder(settings: Settings, backend: Backend) -> None:
    folder = settings.socket_dir(backend.value)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AgentError(f"cannot create the socket folder {folder}: {err.strerror}",
                         f"make {folder} a folder root can write to") from err


def _check_external_servers(ctx: HookContext, vm: VmSpec) -> None:
    """QEMU with `reconnect` does not start until the external switch's socket accepts it."""
    for nic in vm.nics:
        if nic.backend is not Backend.EXTERNAL:
            continue
        path = ctx.settings.socket_dir(Backend.EXTERNAL.value) / nic.socket_name
        why = unix_socket_refusal(path, EXTERNAL_CONNECT_TIMEOUT)
        if why:
            raise ConfigConflict(
                f"VM {vm.vmid} {nic.name}: nothing listens on {path} ({why}), and QEMU would wait for it forever",
                f"start VPP/TNSR first (it must create {path}), or order the VM's start after it",
            )


def _check_ports_open(ctx: HookContext, db: Ovsdb, vm: VmSpec) -> None:
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
            return
        if remaining <= 0:
            raise AgentTimeout(f"VM {vm.vmid}: ovs-vswitchd has not opened {', '.join(waiting)} "
                               f"within {ctx.settings.ovs_timeout:g} s", "is ovs-vswitchd running and not stuck?")
        db.wait_for_change(seqno, remaining)


def _apply(ctx: HookContext, db: Ovsdb, plan: Callable) -> None:
    """Observe, plan, apply; each action logged with its fields (one transaction per step)."""
    actions = plan(db.snapshot())
    if not actions:
        ctx.log.info("VM %s: Open vSwitch already as planned", ctx.vm.vmid, extra={"action": "PlanOvs", "result": "unchanged"})
        return
    for action in actions:
        fields = {k: getattr(action, k) for k in ("nic", "port", "bridge") if getattr(action, k, None)}
        ctx.log.info("VM %s: %s", ctx.vm.vmid, action, extra={**fields, "action": type(action).__name__, "result": "planned"})
    with timed_action(ctx.log, "ApplyOvs", f"VM {ctx.vm.vmid}: apply {len(actions)} Open vSwitch change(s)"):
        db.apply(actions)
