"""What a VM start uses from its config, and whether its args are the agent's plan for it.

Pure. qemu-server's `vm_start_nolock` applies `[PENDING]` before pre-start only on a cold
start: a migration target (`PVE_MIGRATED_FROM`) and a resume from hibernation (`vmstate:`
or `lock: suspended`) start from the main section, the config the VM already runs with.
So the args, the memory size and the NICs a start needs come from that section then.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.model import names
from pve_vhost_agent.plan.argsync import describe_changes, is_hibernated
from pve_vhost_agent.errors import StaleArgs
from pve_vhost_agent.model.spec import VmSpec
from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig



@dataclasses.dataclass(frozen=True)
class StartConfig:
    """The config values a start builds QEMU's command line from."""

    values: Mapping[str, str]
    resumes: str  # "" on a cold start, else why the main section is used


def start_config(config: VmConfig, migrated_from: str | None) -> StartConfig:
    main = config.section(MAIN)
    if migrated_from:
        return StartConfig(main, f"a migration from {migrated_from}")
    if is_hibernated(main):
        return StartConfig(main, "a resume from hibernation")
    return StartConfig(config.effective(), "")


def nic_indices(words: tuple[str, ...]) -> set[int]:
    """The `netN` indices of the agent's vhost-user NICs in agent-owned args words."""
    found = set()
    for pair in qemuargs.option_pairs(qemuargs.split_args(" ".join(words))):
        index = names.args_nic_index(pair.props.get("id", ""))
        if index is not None:
            found.add(index)
    return found


def socket_vmids(words: tuple[str, ...]) -> set[int]:
    """The VMs whose sockets agent-owned args words use (a clone's args name another VM's)."""
    found = set()
    for pair in qemuargs.option_pairs(qemuargs.split_args(" ".join(words))):
        if pair.kind == "chardev":
            vmid = names.socket_vmid(pair.props.get("path", "").rsplit("/", 1)[-1])
            if vmid is not None:
                found.add(vmid)
    return found


def served_spec(vm: VmSpec, start: StartConfig) -> VmSpec:
    """The NICs this start must serve: the spec's on a cold start; on a migration or
    resume exactly those in the args the VM runs with (it cannot gain or lose one)."""
    if not start.resumes:
        return vm
    running = nic_indices(qemuargs.agent_args(start.values.get("args", "")))
    dropped = sorted(running - {nic.index for nic in (*vm.nics, *vm.links)})
    if dropped:
        raise StaleArgs(
            f"VM {vm.vmid}: its running args still have net{dropped[0]}, which the spec no longer declares",
            f"restart the VM before migrating, or re-add the NIC (pve-vhost-agent nic add {vm.vmid} net{dropped[0]} ...)",
        )
    return dataclasses.replace(vm, nics=tuple(nic for nic in vm.nics if nic.index in running),
                               links=tuple(end for end in vm.links if end.index in running))


def stale_args(vm: VmSpec, current: tuple[str, ...], planned: tuple[str, ...], start: StartConfig) -> StaleArgs | None:
    """The refusal for a start whose agent args differ from the plan (None: they match)."""
    if current == planned:
        return None
    vmid = vm.vmid
    others = sorted(socket_vmids(current) - {vmid})
    copied = f"; they use the socket of VM {others[0]}: a clone or restore copied that VM's args" if others else ""
    if not vm:
        why = copied or ": a clone or restore probably copied another VM's args"
        return StaleArgs(
            f"VM {vmid} has the agent's vhost-user args but no spec{why}",
            f"remove them with `pve-vhost-agent apply {vmid}`, or declare its NICs "
            f"(pve-vhost-agent nic add {vmid} netN ..., then apply {vmid}), then start it again",
        )
    changes = "; ".join(describe_changes(current, planned))
    if start.resumes:
        return StaleArgs(
            f"VM {vmid}: the args it runs with (main section: {start.resumes} does not apply [PENDING]) "
            f"do not match its spec ({changes})",
            "restart the VM before migrating (a cold start applies the pending args), or change the spec back",
        )
    return StaleArgs(
        f"VM {vmid}: the args line does not match its spec ({changes}){copied}",
        f"run `pve-vhost-agent apply {vmid}`, then start the VM again",
    )
