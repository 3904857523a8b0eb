"""Keep a VM's `args:` line in step with its plan: compare, explain, and say where to write.

Pure. The plan comes from argsplan; the VM config from vmconfig. Proxmox builds the
command line from the config it loaded before pre-start, so the line must be right
before a start: a running or hibernated VM (which resumes from its main section) gets
the new line as a `[PENDING]` change (as `qm set` does), a stopped VM in its main section
(or in `[PENDING]` when a pending `args` or `delete: args` would override the main one at
the next start).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.plan.args import ArgsPlan
from pve_vhost_agent.formats.vmconfig import MAIN, PENDING, VmConfig


@dataclasses.dataclass(frozen=True)
class ArgsSync:
    """Where a VM's args stand against its plan."""

    current: tuple[str, ...]  # the agent-owned words the next start would use
    plan: ArgsPlan
    section: str  # where a new line goes: "main" or "pending"
    line_after: str | None  # the whole args line to write (None: no args key at all)
    config_after: VmConfig

    @property
    def in_sync(self) -> bool:
        return self.current == self.plan.args

    @property
    def changes(self) -> tuple[str, ...]:
        return describe_changes(self.current, self.plan.args)


def is_hibernated(main: Mapping[str, str]) -> bool:
    """qemu-server resumes such a VM from its main section; [PENDING] waits for a cold start."""
    return "vmstate" in main or main.get("lock") == "suspended"


def sync_args(config: VmConfig, plan: ArgsPlan, running: bool) -> ArgsSync:
    """Compare the args the next start would use with `plan`; compute the config to write."""
    effective = config.effective().get("args", "")
    current = qemuargs.agent_args(effective)
    main = config.section(MAIN)
    pending = config.section(PENDING)
    later = running or is_hibernated(main)
    section = PENDING if later or "args" in pending or "args" in config.pending_delete else MAIN
    if current == plan.args:
        return ArgsSync(current, plan, section, effective or None, config)
    merged = qemuargs.merge_agent_args(effective, plan.args) or None
    if section == MAIN:
        after = config.with_value("args", merged, MAIN)
    elif merged == (main.get("args") or None):
        # The main section already has this line: no pending change is needed.
        after = config.with_value("args", None, PENDING).with_pending_delete("args", False)
    elif merged is None:
        # No line at all, but the main section has one: delete it at the next start.
        after = config.with_value("args", None, PENDING).with_pending_delete("args", True)
    else:
        after = config.with_value("args", merged, PENDING).with_pending_delete("args", False)
    return ArgsSync(current, plan, section, merged, after)


def describe_changes(current: tuple[str, ...], planned: tuple[str, ...]) -> tuple[str, ...]:
    """Human lines naming what differs between the agent's args now and the plan, per id."""
    now, want = _by_id(current), _by_id(planned)
    lines = []
    for ident in sorted({i for _, i in now} | {i for _, i in want}):
        have = {k: p for (k, i), p in now.items() if i == ident}
        need = {k: p for (k, i), p in want.items() if i == ident}
        if not need:
            lines.append(f"{ident}: in args but no longer planned")
        elif not have:
            lines.append(f"{ident}: planned but not in args")
        else:
            for kind in sorted(set(have) | set(need)):
                old, new = have.get(kind), need.get(kind)
                if old is None or new is None:
                    lines.append(f"{ident}: -{kind} " + ("missing" if old is None else "no longer planned"))
                elif old != new:
                    diffs = [f"{k} {old.get(k, '(none)')} -> {new.get(k, '(none)')}"
                             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                    lines.append(f"{ident}: -{kind} " + ", ".join(diffs))
    if not lines and current != planned:
        lines.append("the agent's args are in a different order than planned")
    return tuple(lines)


def _by_id(args: tuple[str, ...]) -> dict[tuple[str, str], dict[str, str]]:
    """(option kind, id) -> properties; `-machine memory-backend=X` counts under id X."""
    out = {}
    for pair in qemuargs.option_pairs(qemuargs.split_args(" ".join(args))):
        props = pair.props
        ident = props.get("id") or props.get("memory-backend") or pair.value.text
        out[(pair.kind, ident)] = props
    return out
