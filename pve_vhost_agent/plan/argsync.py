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
from typing import Mapping, Sequence

from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.plan.args import ArgsPlan
from pve_vhost_agent.formats.vmconfig import MAIN, PENDING, VmConfig
from pve_vhost_agent.model.names import args_nic_index, nic_name
from pve_vhost_agent.model.spec import VhostNic
from pve_vhost_agent.plan.marks import mark_changes, with_marks


@dataclasses.dataclass(frozen=True)
class ArgsSync:
    """Where a VM's args stand against its plan."""

    current: tuple[str, ...]  # the agent-owned words the next start would use
    plan: ArgsPlan
    section: str  # where a new line goes: "main" or "pending"
    line_after: str | None  # the whole args line to write (None: no args key at all)
    config_after: VmConfig
    marks: tuple[str, ...] = ()  # what changes of the GUI marks (tag, notes line): plan/marks

    @property
    def args_in_sync(self) -> bool:
        return self.current == self.plan.args

    @property
    def in_sync(self) -> bool:
        return self.args_in_sync and not self.marks

    @property
    def changes(self) -> tuple[str, ...]:
        return describe_changes(self.current, self.plan.args) + self.marks


def is_hibernated(main: Mapping[str, str]) -> bool:
    """qemu-server resumes such a VM from its main section; [PENDING] waits for a cold start."""
    return "vmstate" in main or main.get("lock") == "suspended"


def sync_args(config: VmConfig, plan: ArgsPlan, running: bool,
              marked: Sequence[VhostNic] | None = None, user_line: str | None = None) -> ArgsSync:
    """Compare the args the next start would use with `plan`; compute the config to write.

    `marked`: the vhost-user NICs the GUI marks must name (plan/marks; none: no marks);
    None leaves the marks as they are (a VM the agent does not keep).
    `user_line` replaces the user's part of the line (`adopt` takes its words out).
    """
    sync = _sync_args(config, plan, running, user_line)
    if marked is None:
        return sync
    after = with_marks(sync.config_after, marked)
    return dataclasses.replace(sync, config_after=after, marks=mark_changes(sync.config_after, after))


def _sync_args(config: VmConfig, plan: ArgsPlan, running: bool, user_line: str | None) -> ArgsSync:
    effective = config.effective().get("args", "")
    current = qemuargs.agent_args(effective)
    if user_line is not None:
        effective = user_line
    main = config.section(MAIN)
    pending = config.section(PENDING)
    later = running or is_hibernated(main)
    section = PENDING if later or "args" in pending or "args" in config.pending_delete else MAIN
    if current == plan.args and user_line is None:
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
    """What differs between the agent's args now and the plan, in an operator's words
    ("memory changed from 4096 to 6144 MiB since the args were written")."""
    now, want = _view(current), _view(planned)
    lines = []
    if now.memory != want.memory:
        if now.memory and want.memory:
            lines.append(f"memory changed from {_mib(now.memory)} to {_mib(want.memory)} MiB since the args were written")
        elif want.memory:
            lines.append("the shared memory backend is missing from the args")
        else:
            lines.append("the args share guest memory, which is no longer needed")
    for index in sorted(set(now.nics) | set(want.nics)):
        net = nic_name(index)
        if index not in want.nics:
            lines.append(f"{net} is in the args but no longer declared")
        elif index not in now.nics:
            lines.append(f"{net} is declared but not in the args")
        else:
            lines += [f"{net}: {what}" for what in _nic_changes(now.nics[index], want.nics[index])]
    if not lines and current != planned:
        lines.append("the agent's args are in a different order than planned")
    return tuple(lines)


@dataclasses.dataclass
class _ArgsView:
    """What the agent's part of an args line says: the memory backend and each NIC's options."""

    memory: str = ""  # the backend's size, e.g. 4096M ('' when there is none)
    nics: dict[int, dict[tuple[str, str], str]] = dataclasses.field(default_factory=dict)  # (option, key) -> value


def _view(args: tuple[str, ...]) -> _ArgsView:
    view = _ArgsView()
    for pair in qemuargs.option_pairs(qemuargs.split_args(" ".join(args))):
        props = pair.props
        index = args_nic_index(props.get("id", ""))
        if index is not None:
            nic = view.nics.setdefault(index, {})
            nic.update({(pair.kind, key): value for key, value in props.items() if key != "id"})
        elif pair.kind == "object":
            view.memory = props.get("size", "?")
    return view


# What an operator calls the option keys the agent writes.
_ASPECTS = {
    ("chardev", "path"): "socket", ("device", "mac"): "MAC", ("device", "host_mtu"): "MTU",
    ("device", "rx_queue_size"): "rx queue size", ("device", "tx_queue_size"): "tx queue size",
    ("netdev", "queues"): "queue pairs", ("device", "addr"): "PCI slot", ("device", "bus"): "PCI bus",
}
_SOCKET_ROLE = ("server", "wait", "reconnect", "reconnect-ms")


def _nic_changes(old: dict[tuple[str, str], str], new: dict[tuple[str, str], str]) -> list[str]:
    out = []
    role = [k for k in sorted(set(old) | set(new)) if k[0] == "chardev" and k[1] in _SOCKET_ROLE]
    if any(old.get(k) != new.get(k) for k in role):
        out.append(f"socket options changed from {_role(old)} to {_role(new)}")
    for key in sorted(set(old) | set(new)):
        if key in role or old.get(key) == new.get(key):
            continue
        name = _ASPECTS.get(key, f"{key[1]}")
        out.append(f"{name} changed from {old.get(key, 'none')} to {new.get(key, 'none')}")
    return out


def _role(props: dict[tuple[str, str], str]) -> str:
    return ",".join(f"{k}={props[('chardev', k)]}" for k in _SOCKET_ROLE if ("chardev", k) in props) or "none"


def _mib(size: str) -> str:
    return size[:-1] if size.endswith("M") else size
