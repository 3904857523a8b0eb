"""The host network doctor: one observed snapshot in, findings out. Pure.

`diagnose` runs every check over a `DoctorInput` (flows/doctor.py observes it): the
network checks (plan/doctor_net.py: /etc/network/interfaces against the kernel, MTU
chains, bonds, bridges, NAT), the Open vSwitch and OVS-DPDK checks for the NICs this
node's VMs declare (plan/doctor_ovs.py), their VM-to-VM link ends (plan/doctor_links.py:
dark links, an underlay too small for the guest MTU), and the agent's own state (here). A
part that could not be observed is None with a one-line reason, which becomes a finding
itself.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.formats.qemuargs import agent_args
from pve_vhost_agent.formats.vmconfig import MAIN
from pve_vhost_agent.model.findings import Finding, Severity, sorted_findings
from pve_vhost_agent.model.hostnet import HostFacts, HostNet, NetworkFile
from pve_vhost_agent.model.links import LinkFacts
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.model.spec import ClusterSpec, VmSpec
from pve_vhost_agent.plan import doctor_links, doctor_net, doctor_ovs
from pve_vhost_agent.plan.observed import LocalVm

SPEC_FOLDER = "/etc/pve/pve-vhost-agent"


@dataclasses.dataclass(frozen=True)
class DoctorInput:
    """What the doctor observed. A part that could not be read is None, and `*_problem` says why."""

    network_file: NetworkFile | None = None  # None: /etc/network/interfaces does not exist
    net: HostNet | None = None
    net_problem: str = ""
    facts: HostFacts | None = None
    facts_problem: str = ""
    ovs: OvsState | None = None
    ovs_problem: str = ""
    spec: ClusterSpec | None = ClusterSpec()
    spec_problem: str = ""
    vms: tuple[LocalVm, ...] = ()  # this node's VMs
    vm_problems: tuple[str, ...] = ()  # configs that could not be read
    running: frozenset[int] = frozenset()
    cluster_vmids: frozenset[int] = frozenset()  # every VM id with a config on any node
    links: LinkFacts | None = None  # where the link ends' peers are; None: not read (or no link ends here)
    links_problem: str = ""

    def declared(self) -> Iterator[tuple[LocalVm, VmSpec]]:
        """This node's VMs with declarations (vhost-user NICs, QinQ, link ends), and what they declare."""
        if self.spec is None:
            return
        for vm in self.vms:
            spec = self.spec.for_vm(vm.vmid)
            if spec:
                yield vm, spec


def diagnose(inp: DoctorInput) -> tuple[Finding, ...]:
    """Every finding, errors first."""
    declared = tuple(inp.declared())
    return sorted_findings([
        *doctor_net.findings(inp.network_file, inp.net, inp.net_problem, inp.vms),
        *doctor_ovs.findings(declared, inp.ovs, inp.ovs_problem, inp.net, inp.facts, inp.facts_problem, inp.running),
        *doctor_links.findings(declared, inp.spec, inp.links, inp.links_problem),
        *agent_findings(inp),
    ])


def agent_findings(inp: DoctorInput) -> Iterable[Finding]:
    """The agent's own state: its spec, and this node's VMs against it."""
    if inp.spec is None:
        yield Finding(Severity.ERROR, SPEC_FOLDER, inp.spec_problem, "fix the file named above", "spec-unreadable")
    for problem in inp.vm_problems:
        yield Finding(Severity.WARNING, "VM config", problem, "fix or remove the file", "vm-config-unreadable")
    if inp.spec is not None:
        yield from _gone_vms(inp.spec, inp.cluster_vmids)
    for vm in inp.vms:
        yield from _vm_state(vm, inp.spec.for_vm(vm.vmid) if inp.spec is not None else None)


def _gone_vms(spec: ClusterSpec, existing: frozenset[int]) -> Iterator[Finding]:
    for vmid in sorted({*spec.vmids(), *(h.vmid for h in spec.hooks)} - existing):
        vm = spec.for_vm(vmid)
        what = ", ".join([n.name for n in (*vm.nics, *vm.tap_qinq, *vm.links)]) or "a chained hookscript"
        yield Finding(Severity.WARNING, f"VM {vmid}",
                      f"{SPEC_FOLDER}/{vmid}.cfg declares {what}, but no node has a VM {vmid} (destroyed?)",
                      f"remove the file: rm {SPEC_FOLDER}/{vmid}.cfg", "spec-without-vm")


def _vm_state(vm: LocalVm, spec: VmSpec | None) -> Iterator[Finding]:
    config = vm.config.effective()
    try:
        owned = agent_args(config.get("args", ""))
    except AgentError:
        owned = ()  # a line Proxmox cannot split: apply and the hook say so
    hookscript = vm.config.section(MAIN).get("hookscript", "")
    if owned and not vm.enabled:
        yield Finding(Severity.ERROR, f"VM {vm.vmid}",
                      f"its args line carries the agent's vhost-user options but its hookscript is "
                      f"{hookscript or 'unset'}, so nothing makes its Open vSwitch ports and QEMU waits for them at start",
                      f"run `pve-vhost-agent enable {vm.vmid}` (or `pve-vhost-agent apply {vm.vmid}` when the "
                      f"declarations are gone, to drop those options)", "args-without-hookscript")
    elif spec and not vm.enabled:
        yield Finding(Severity.INFO, f"VM {vm.vmid}",
                      "has declarations (vhost-user NICs, QinQ or link ends) but not the agent's hookscript, so they take no effect",
                      f"run `pve-vhost-agent enable {vm.vmid}` when it should use them", "declared-not-enabled")
