"""The hookscript's phases as plans: what a start, a running VM and a stop need. Pure.

Proxmox calls `<script> <vmid> <phase>`; only a non-zero exit of pre-start changes what
it does (it aborts the start). So `plan_pre_start` checks everything the start needs and
either refuses (raises the AgentError the start is aborted with) or returns what to make:

- the args line must already be right: Proxmox loaded the config before this hook and
  will not read it again (a migration or a resume uses the main section);
- QinQ on Proxmox's tap NICs must be able to hold after pve-bridge plugs them (on
  Open vSwitch: plan/tapqinq; on Linux bridges: plan/lbqinq);
- the socket folders must be the agent's to use, and an `external` switch must listen:
  QEMU would wait for it forever;
- the OVS ports of the NICs it serves (ovs-vswitchd must open them before QEMU starts,
  which the flow waits for: `StartPlan.ports`);
- room for the shared memory is only warned about (Proxmox starts a VM whatever is free);
- link ends need nothing from their peer (either end starts first): the start says where
  each will point, and warns when the underlay cannot carry a whole guest frame.

`post_start_actions` puts QinQ on the taps pve-bridge plugged; `post_start_report` says
how the ports and the taps' uplinks look. Post-stop is `plan.ovs.plan_vm_removal` and the
VM's stale sockets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from pve_vhost_agent.errors import AgentError, ConfigConflict, OvsUnavailable
from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.formats.vmlayout import memory_layout
from pve_vhost_agent.model.actions import Action, AddVhostPort, DelPort, MakeSocketDir, ReplaceVhostPort
from pve_vhost_agent.model.host import Folder, HostMemory, Link
from pve_vhost_agent.model.notes import Note
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.model.spec import Backend, VmSpec
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.plan.capacity import capacity_warnings, shared_memory_need
from pve_vhost_agent.plan.ovs import plan_tap_qinq, plan_vhost_ports
from pve_vhost_agent.plan.start import served_spec, stale_args, start_config
from pve_vhost_agent.plan.tapqinq import check_before_start, link_warnings

if TYPE_CHECKING:  # each start loads these only when its VM has link ends or QinQ taps
    from pve_vhost_agent.model.links import LinkFacts
    from pve_vhost_agent.model.netdevs import LinkState


@dataclasses.dataclass(frozen=True)
class StartView:
    """What pre-start observed. The optional parts are read only when the VM needs them:
    `qemu_version`, `memory`, `folders` and `external` for vhost-user NICs, `ovs` (the
    VM's own rows) for `ovs` NICs and tap QinQ on Open vSwitch, `netdevs` for tap QinQ on Linux bridges, `links` for link ends."""

    spec: VmSpec
    config: VmConfig  # where this start reads it (the source's folder during a migration)
    migrated_from: str | None
    socket_dirs: Mapping[Backend, Path]
    qemu_version: tuple[int, int, int] = (0, 0, 0)
    memory: HostMemory | None = None
    folders: Mapping[Backend, Folder] = dataclasses.field(default_factory=dict)
    external: Mapping[int, str | None] = dataclasses.field(default_factory=dict)  # NIC -> why no answer
    ovs: OvsState | None = None
    ovs_error: AgentError | None = None  # why `ovs` could not be read: raised once the local checks pass
    netdevs: LinkState | None = None  # the host's network devices (tap QinQ on Linux bridges)
    links: LinkFacts | None = None  # where the link ends' peers are (None: not read)


@dataclasses.dataclass(frozen=True)
class StartPlan:
    """What pre-start makes and says."""

    served: VmSpec  # the NICs this start serves (a migration: exactly those it runs with)
    notes: tuple[Note, ...] = ()  # checks that passed, one line each for the task log
    warnings: tuple[Note, ...] = ()
    actions: tuple[Action, ...] = ()
    ports: tuple[str, ...] = ()  # vhost-user ports ovs-vswitchd must have opened before QEMU starts


def plan_pre_start(view: StartView) -> StartPlan:
    """The pre-start plan, or the refusal that aborts the start (raised)."""
    start = start_config(view.config, view.migrated_from)
    vm = served_spec(view.spec, start)
    args = plan_args(vm, start.values, view.qemu_version, view.socket_dirs)
    stale = stale_args(vm, qemuargs.agent_args(start.values.get("args", "")), args.args, start)
    if stale:
        raise stale
    notes, warnings, actions = [], [], []
    if vm.nics or vm.links:
        nics = ", ".join(nic.name for nic in sorted((*vm.nics, *vm.links), key=lambda nic: nic.index))
        notes.append(Note(f"args line matches the spec ({nics})" + (f", as {start.resumes} runs it" if start.resumes else ""),
                          "CheckArgs"))
    if vm.links and view.links is not None:
        from pve_vhost_agent.plan.links import start_notes  # only a VM with link ends

        link_notes, link_warnings = start_notes(vm.links, view.links)
        notes += [Note(text, "CheckLinks") for text in link_notes]
        warnings += [Note(text, "CheckLinks") for text in link_warnings]
    if vm.nics:
        need = shared_memory_need(memory_layout(start.values))
        warnings += [Note(text, "CheckMemory") for text in capacity_warnings(vm.vmid, need, view.memory)]
        for backend in sorted({nic.backend for nic in vm.nics}, key=lambda b: b.value):
            actions += _socket_folder(view.folders[backend])
        _check_external_servers(view, vm)
    ovs_nics = vm.ovs_nics
    linux, ovs_taps = (), vm
    if vm.tap_qinq:
        from pve_vhost_agent.plan import lbqinq  # only QinQ taps may be on a Linux bridge

        linux = lbqinq.linux_taps(vm, start.values, view.netdevs)
        ovs_taps = lbqinq.without_taps(vm, linux)
    if (ovs_nics or ovs_taps.tap_qinq) and view.ovs is None:
        raise view.ovs_error or OvsUnavailable("Open vSwitch was not read", "this is a bug: report it")
    if vm.tap_qinq:
        if linux:
            lbqinq.check_before_start(vm.vmid, linux, start.values, view.netdevs)
        if ovs_taps.tap_qinq:
            check_before_start(ovs_taps, start.values, view.ovs)
        notes.append(Note("QinQ can hold on " + ", ".join(f"{e.port_name} (S-tag {e.qinq.stag})" for e in vm.tap_qinq),
                          "CheckTapQinQ"))
    if ovs_nics:
        actions += plan_vhost_ports(vm, view.ovs, view.socket_dirs[Backend.OVS])
    return StartPlan(vm, tuple(notes), tuple(warnings), tuple(actions), tuple(nic.port_name for nic in ovs_nics))


def undo_start(done: tuple[Action, ...]) -> tuple[Action, ...]:
    """What removes the ports a pre-start committed before it gave up (newest first)."""
    undo = []
    for action in reversed(done):
        add = action.add if isinstance(action, ReplaceVhostPort) else action
        if isinstance(add, AddVhostPort):
            undo.append(DelPort(add.port, add.bridge, add.vmid, "the start was aborted"))
    return tuple(undo)


def post_start_actions(vm: VmSpec, state: OvsState) -> tuple[Action, ...]:
    """QinQ on the taps pve-bridge plugged after pre-start."""
    return plan_tap_qinq(vm, state) if vm.tap_qinq else ()


def post_start_report(vm: VmSpec, state: OvsState, links: Mapping[str, Link] | None) -> tuple[tuple[Note, ...], tuple[Note, ...]]:
    """(notes, warnings) on the VM's ports after the start: each vhost-user port's state
    (OVS says `connected` only once the guest's driver runs: reported, not waited for), and
    the QinQ taps and their bridges' uplinks (`links` None: they could not be read)."""
    notes, warnings = [], []
    for nic in vm.ovs_nics:
        port = state.port(nic.port_name)
        iface = port.interface if port else None
        if iface is None:
            warnings.append(Note(f"VM {vm.vmid} {nic.name}: Open vSwitch has no port {nic.port_name}", "CheckPort",
                                 nic.name, nic.port_name))
            continue
        status = ", ".join(f"{k} {v}" for k, v in sorted(iface.status.items()) if k in ("mode", "status"))
        notes.append(Note(f"port {nic.port_name} on {port.bridge}: {status or 'no status yet'}", "CheckPort",
                          nic.name, nic.port_name))
    if vm.tap_qinq and links is not None:
        warnings += [Note(w.text, "CheckTapLinks", w.nic, w.port) for w in link_warnings(vm, state, links)]
    return tuple(notes), tuple(warnings)


def _socket_folder(folder: Folder) -> tuple[Action, ...]:
    if folder.problem:
        raise ConfigConflict(f"refusing the socket folder {folder.path}: {folder.problem}, and QEMU runs as root "
                             "with the guest's memory on the sockets there",
                             "make it a folder of root's with mode 0755, or remove it and let the agent make it")
    return () if folder.exists else (MakeSocketDir(folder.path),)


def _check_external_servers(view: StartView, vm: VmSpec) -> None:
    """QEMU with `reconnect` does not start until the external switch's socket accepts it."""
    for nic in vm.nics:
        why = view.external.get(nic.index) if nic.backend is Backend.EXTERNAL else None
        if why:
            path = nic.socket_path(view.socket_dirs)
            raise ConfigConflict(
                f"VM {vm.vmid} {nic.name}: nothing listens on {path} ({why}), and QEMU would wait for it forever",
                f"start VPP/TNSR first (it must create {path}), or order the VM's start after it",
            )
