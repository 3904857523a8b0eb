"""Carry out a plan, and say each step once: the one place actions become changes.

Hooks, the service and the commands hand their planned actions here. File actions and
a running QEMU's link sockets (QMP) are done one by one; Open vSwitch actions go to
`Ovsdb.apply` (one transaction per step, many VMs per transaction where the plan allows it);
netlink actions (Linux bridges) one by one under the agent's netdev lock. Every action is logged once, after
it took effect, as its sentence (task log, service log) with its fields (journald).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from pve_vhost_agent.adapters import sockets
from pve_vhost_agent.adapters.vmstore import vm_guard, vm_guards
from pve_vhost_agent.errors import OvsUnavailable, VmBusy, VmChanged
from pve_vhost_agent.model.actions import NETLINK, OVS, QMP, Action, DelSocket, MakeSocketDir, WriteVmArgs
from pve_vhost_agent.settings import Settings

if TYPE_CHECKING:  # the caller brings the connection: no python-ovs import here
    from pve_vhost_agent.adapters.ovsdb import Ovsdb, Step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Applied:
    """What a run of `apply_plan` did: the actions that took effect, the ones left for later."""

    done: list[Action] = dataclasses.field(default_factory=list)
    skipped: list[tuple[Action, str]] = dataclasses.field(default_factory=list)


def report(logger: logging.Logger | logging.LoggerAdapter, action: Action, result: str, duration_ms: int | None,
           level: int = logging.INFO) -> None:
    """One line for people (the action's sentence, and its result when it is not plain
    success), one journald entry with the action's fields."""
    text = action.sentence() if result in ("done", "changed") else f"{action.sentence()}: {result}"
    logger.log(level, "%s", text, extra={"fields": {**action.fields(), "result": result, "duration_ms": duration_ms}})


def apply_plan(settings: Settings, actions: Sequence[Action], logger: logging.Logger | logging.LoggerAdapter, *,
               db: Ovsdb | None = None, guards: Mapping[int, bool] | None = None,
               write_args: Callable[[WriteVmArgs], str] | None = None, applied: Applied | None = None,
               wait: bool = True, netdev_locked: bool = False) -> Applied:
    """Apply `actions` in order, each run of OVS actions as one `Ovsdb.apply`.

    With `guards` (VM id -> must run), a VM's actions are applied only under its Proxmox
    lock (waiting at most settings.lock_timeout) while it still is as planned; the others
    are skipped (a later pass plans anew).
    `write_args` writes a WriteVmArgs. The first AgentError is raised; what took effect
    before it is in `applied` (pass one in to keep it then, e.g. to undo it). `wait=False`
    does not wait for ovs-vswitchd after the last OVS step. `netdev_locked`: the caller
    holds the netdev lock already (it observed and planned under it).
    """
    applied = Applied() if applied is None else applied
    for target, run in _runs(actions):
        if target == OVS:
            _apply_ovs(settings, run, logger, db, guards, applied, wait)
        elif target == NETLINK:
            _apply_netlink(settings, run, logger, guards, applied, netdev_locked)
        elif target == QMP:
            from pve_vhost_agent.adapters import links  # only link ends talk to a running QEMU

            for action in run:
                _apply_one(settings, action, logger, guards, applied, lambda a=action: links.apply(settings, a))
        else:
            for action in run:
                _apply_file(settings, action, logger, guards, write_args, applied)
    return applied


def _runs(actions: Sequence[Action]) -> list[tuple[str, list[Action]]]:
    runs: list[tuple[str, list[Action]]] = []
    for action in actions:
        if runs and runs[-1][0] == action.target:
            runs[-1][1].append(action)
        else:
            runs.append((action.target, [action]))
    return runs


def _apply_ovs(settings: Settings, actions: list[Action], logger, db: Ovsdb | None,
               guards: Mapping[int, bool] | None, applied: Applied, wait: bool) -> None:
    if db is None:
        raise OvsUnavailable(f"no connection to OVSDB at {settings.ovsdb}",
                             "is openvswitch-switch running? (systemctl status openvswitch-switch)")

    def on_step(step: Step) -> None:
        for action in step.actions:
            applied.done.append(action)
            report(logger, action, "done" if step.cfg else "unchanged", step.duration_ms)
        for action in actions:
            why = step.skipped.get(getattr(action, "vmid", None))
            if why and action not in step.actions:
                applied.skipped.append((action, why))
                report(logger, action, why, None)

    db.apply(actions, guard=vm_guards(settings, guards) if guards else None, on_step=on_step, wait=wait)


def _apply_netlink(settings: Settings, actions: list[Action], logger, guards: Mapping[int, bool] | None,
                   applied: Applied, locked: bool) -> None:
    from pve_vhost_agent.adapters import linkchange  # pyroute2: only where Linux bridges are involved

    vmids = frozenset(a.vmid for a in actions if getattr(a, "vmid", None) in (guards or {}))
    with contextlib.ExitStack() as stack:
        # VM locks before the netdev lock, in the order the hooks take them (Proxmox holds
        # the VM's while a hook runs).
        _ok, why = stack.enter_context(vm_guards(settings, guards)(vmids)) if vmids else (vmids, {})
        if not locked:
            stack.enter_context(linkchange.netdev_lock(settings))
        changer = stack.enter_context(linkchange.LinkChanger())
        for action in actions:
            skipped = why.get(getattr(action, "vmid", None))
            started = time.monotonic()
            result = skipped or changer.apply(action)
            if result.startswith("skipped"):
                applied.skipped.append((action, result))
            else:
                applied.done.append(action)
            report(logger, action, result, None if skipped else round((time.monotonic() - started) * 1000))


def _apply_one(settings: Settings, action: Action, logger, guards: Mapping[int, bool] | None, applied: Applied,
               run: Callable[[], str]) -> None:
    """`run` the action, under its VM's guard when `guards` names the VM."""
    started = time.monotonic()
    try:
        if guards is not None and getattr(action, "vmid", None) in guards:
            with vm_guard(settings, action.vmid, guards[action.vmid]):
                result = run()
        else:
            result = run()
    except VmBusy:
        result = "skipped: the VM is busy"
    except VmChanged:
        result = "skipped: the VM started or stopped meanwhile"
    _record(logger, action, result, started, applied)


def _record(logger, action: Action, result: str, started: float, applied: Applied) -> None:
    if result.startswith("skipped"):
        applied.skipped.append((action, result))
    else:
        applied.done.append(action)
    report(logger, action, result, round((time.monotonic() - started) * 1000))


def _apply_file(settings: Settings, action: Action, logger, guards: Mapping[int, bool] | None,
                write_args: Callable[[WriteVmArgs], str] | None, applied: Applied) -> None:
    started = time.monotonic()
    try:
        if isinstance(action, MakeSocketDir):
            result = "done" if sockets.make_folder(Path(action.path)) else "unchanged"
        elif isinstance(action, DelSocket):
            if guards is not None and action.vmid in guards:
                with vm_guard(settings, action.vmid, guards[action.vmid]):
                    result = sockets.remove_socket(Path(action.path))
            else:
                result = sockets.remove_socket(Path(action.path))
        elif isinstance(action, WriteVmArgs) and write_args is not None:
            result = write_args(action)
        else:
            raise TypeError(f"no way to apply {action!r} here")
    except VmBusy:
        result = "skipped: the VM is busy"
    except VmChanged:
        result = "skipped: the VM started or stopped meanwhile"
    _record(logger, action, result, started, applied)

