"""What the agent does when Proxmox starts and stops a VM: the hookscript's four phases.

Proxmox calls `<script> <vmid> <phase>`; only a non-zero exit of pre-start changes what
Proxmox does (it aborts the start). So pre-start checks everything the VM needs and
makes it so, or refuses; the other phases do their part and only warn.

- pre-start: the args line must already be right (Proxmox loaded the config before this
  hook and will not read it again), the host must have room for the shared memory, the
  socket folders and OVS ports must exist: QEMU blocks at its vhost-user netdev until
  the switch connects, so a missing port would hang the start.
- post-start: QinQ on Proxmox's tap ports (plugged while QEMU started); port states logged.
- pre-stop: nothing destructive (it does not run when the guest powers off or crashes).
- post-stop: the VM's own OVS ports and sockets go, taps get Proxmox's settings back.

The same planners serve the service; this module only decides what to observe and when.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
from typing import Callable, Mapping

from pve_vhost_agent import ovsplan, pvefs, storagecfg
from pve_vhost_agent.capacity import capacity_problems, shared_memory_need
from pve_vhost_agent.errors import CapacityError, NotFound, StaleArgs, UsageError
from pve_vhost_agent.hostinfo import read_host_memory
from pve_vhost_agent.journal import context_logger, timed_action
from pve_vhost_agent.ovsdb import Ovsdb
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.spec import Backend, ChainedHook, VmSpec
from pve_vhost_agent.vmargs import sync_for
from pve_vhost_agent.vmconfig import VmConfig
from pve_vhost_agent.vmlayout import memory_layout

log = logging.getLogger(__name__)

PHASES = ("pre-start", "post-start", "pre-stop", "post-stop")


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
    log: logging.LoggerAdapter


def run_phase(settings: Settings, call: HookCall, vm: VmSpec) -> None:
    """The agent's own work for `call` (raises AgentError; pre-start's abort the start)."""
    ctx = HookContext(settings, call, vm, context_logger(log, vmid=call.vmid, phase=call.phase))
    _PHASES[call.phase](ctx)


def roll_back(settings: Settings, call: HookCall, vm: VmSpec) -> None:
    """Undo a pre-start whose start is aborted after it (no other hook will run)."""
    if any(nic.backend is Backend.OVS for nic in vm.nics):
        run_phase(settings, dataclasses.replace(call, phase="post-stop"), vm)


def run_chained(settings: Settings, hook: ChainedHook, call: HookCall, env: Mapping[str, str]) -> int:
    """Run the VM's previous hookscript as Proxmox would: same argv, environment, stdin."""
    path = storagecfg.snippet_path(settings, hook.hookscript)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise NotFound(f"chained hookscript {hook.hookscript} ({path}) is missing or not executable",
                       f"restore it, or drop it: pve-vhost-agent disable {call.vmid} && pve-vhost-agent enable {call.vmid}")
    result = subprocess.run([str(path), str(call.vmid), call.phase], env=dict(env), check=False)
    if result.returncode != 0:
        log.warning("chained hookscript %s exited with %d", hook.hookscript, result.returncode,
                    extra={"vmid": call.vmid, "phase": call.phase, "action": "RunChainedHook",
                           "result": f"exit {result.returncode}"})
    return result.returncode


# --- phases ---------------------------------------------------------------------------


def _pre_start(ctx: HookContext) -> None:
    vm, settings = ctx.vm, ctx.settings
    config = _config_at_start(ctx)
    with timed_action(ctx.log, "CheckArgs", f"VM {vm.vmid}: check the args line"):
        sync = sync_for(settings, vm, config, running=False)
        if not sync.in_sync:
            raise StaleArgs(
                f"VM {vm.vmid}: the args line does not match its spec ({'; '.join(sync.changes)})",
                f"run `pve-vhost-agent apply {vm.vmid}`, then start the VM again",
            )
    if vm.nics:
        with timed_action(ctx.log, "CheckMemory", f"VM {vm.vmid}: check room for shared memory"):
            need = shared_memory_need(memory_layout(config.effective()))
            problems = capacity_problems(vm.vmid, need, read_host_memory(settings))
            if problems:
                raise CapacityError(problems[0])
        for backend in sorted({nic.backend for nic in vm.nics}, key=lambda b: b.value):
            folder = settings.socket_dir(backend.value)
            folder.mkdir(parents=True, exist_ok=True)
    if any(nic.backend is Backend.OVS for nic in vm.nics):
        with Ovsdb.from_settings(settings) as db:
            _apply(ctx, db, lambda state: ovsplan.plan_vhost_ports(vm, state, settings.socket_dir(Backend.OVS.value)))


def _post_start(ctx: HookContext) -> None:
    vm = ctx.vm
    if not vm.tap_qinq and not any(nic.backend is Backend.OVS for nic in vm.nics):
        return
    with Ovsdb.from_settings(ctx.settings) as db:
        if vm.tap_qinq:
            _apply(ctx, db, lambda state: ovsplan.plan_tap_qinq(vm, state))
        state = db.snapshot()
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
    vm, settings = ctx.vm, ctx.settings
    with Ovsdb.from_settings(settings) as db:
        _apply(ctx, db, lambda state: ovsplan.plan_vm_removal(vm.vmid, state))
    # QEMU (the server of `ovs` sockets) is gone; a socket file it left is stale. The
    # `external` folder belongs to the external switch: never touched.
    for nic in vm.nics:
        if nic.backend is Backend.OVS:
            sock = settings.socket_dir(Backend.OVS.value) / nic.socket_name
            if sock.is_socket():
                sock.unlink()
                ctx.log.info("VM %s %s: removed stale socket %s", vm.vmid, nic.name, sock,
                             extra={"nic": nic.name, "action": "DelSocket", "result": "removed"})


_PHASES: dict[str, Callable[[HookContext], None]] = {
    "pre-start": _pre_start,
    "post-start": _post_start,
    "pre-stop": _pre_stop,
    "post-stop": _post_stop,
}


# --- helpers --------------------------------------------------------------------------


def _config_at_start(ctx: HookContext) -> VmConfig:
    """The config this start uses. During a migration it still sits in the source's folder,
    and its pending changes stay pending: the target QEMU must match the running one."""
    path = ctx.settings.vm_conf(ctx.vm.vmid, ctx.call.migrated_from)
    text = pvefs.read_text(path)
    if text is None:
        raise NotFound(f"VM {ctx.vm.vmid} has a spec but no config at {path}",
                       f"remove the stale spec (pve-vhost-agent nic list {ctx.vm.vmid}) or restore the VM")
    config = VmConfig.parse(text)
    return config.without_pending() if ctx.call.migrated_from else config


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
