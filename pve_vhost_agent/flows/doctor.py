"""The host network doctor: observe the host (read only), diagnose (plan/doctor.py), report.

`run_doctor` is `pve-vhost-agent doctor`: it reads everything itself, Open vSwitch as
one full snapshot. `DoctorWatch` serves the service: each pass it hands over what the
pass observed already (VMs, spec, OVS) and the watch runs the doctor again only when
/etc/network/interfaces, corosync.conf, the spec, the VMs or OVS changed, or every DOCTOR_INTERVAL
seconds (a bond's LACP partner or a slave's carrier changes without any of these); it
logs a finding once when it appears and once when it is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import PurePosixPath

from pve_vhost_agent.adapters.hostnet import (
    DPKG_STATUS, INTERFACES, VSWITCHD_ALTERNATIVE, file_stamps, read_host_facts, read_host_net, read_network_file,
)
from pve_vhost_agent.adapters import links as link_facts
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.adapters.specstore import load_spec
from pve_vhost_agent.adapters.vmstore import local_vm_configs, vm_running
from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.model.findings import Finding, Severity, error_count
from pve_vhost_agent.model.spec import ClusterSpec, is_decimal
from pve_vhost_agent.plan.doctor import DoctorInput, diagnose
from pve_vhost_agent.plan.observed import LocalVm, NodeState
from pve_vhost_agent.settings import Settings

log = logging.getLogger(__name__)

OVS_TIMEOUT = 5.0  # seconds: the doctor reports an unreachable switch, it does not wait for one
DOCTOR_INTERVAL = 60.0  # the service runs the doctor at least this often
COROSYNC = "/etc/pve/corosync.conf"  # the nodes' cluster addresses, which links between nodes use


def run_doctor(settings: Settings) -> tuple[Finding, ...]:
    return diagnose(observe(settings))


def observe(settings: Settings, node: NodeState | None = None) -> DoctorInput:
    """Everything the checks read; `node` (the service's own observation) saves reading the
    VMs, the spec and Open vSwitch again."""
    net, net_problem = _attempt(read_host_net, settings)
    facts, facts_problem = _attempt(read_host_facts, settings)
    parts = dict(network_file=read_network_file(settings), net=net, net_problem=net_problem, facts=facts,
                 facts_problem=facts_problem, cluster_vmids=_cluster_vmids(settings))
    if node is not None:
        return DoctorInput(**parts, ovs=node.ovs, ovs_problem="" if node.ovs else "Open vSwitch is unreachable",
                           spec=node.spec, spec_problem="the declarations cannot be read (the service's problems say why)",
                           vms=node.vms, running=node.running, **_links(settings, node.spec, node.vms))
    try:
        spec, spec_problem = load_spec(settings), ""
    except AgentError as err:
        spec, spec_problem = None, str(err)
    vms, vm_problems = [], []
    for vmid, config in local_vm_configs(settings):
        if isinstance(config, AgentError):
            vm_problems.append(f"VM {vmid}: {config}")
        else:
            vms.append(LocalVm(vmid, config))
    ovs, ovs_problem = _read_ovs(settings)
    return DoctorInput(**parts, ovs=ovs, ovs_problem=ovs_problem, spec=spec, spec_problem=spec_problem,
                       vms=tuple(vms), vm_problems=tuple(vm_problems),
                       running=frozenset(vm.vmid for vm in vms if vm_running(settings, vm.vmid)),
                       **_links(settings, spec, vms))


def doctor_errors(settings: Settings, node: NodeState) -> int:
    """The error-level findings now (`status`): nothing logged."""
    try:
        return error_count(diagnose(observe(settings, node)))
    except AgentError:
        return 0


def _attempt(read, settings: Settings):
    try:
        return read(settings), ""
    except AgentError as err:
        return None, str(err)


def _links(settings: Settings, spec: ClusterSpec | None, vms) -> dict:
    """Where the peers of this node's link ends are, and the underlay (only with link ends)."""
    peers = {end.peer[0] for vm in vms for end in (spec.for_vm(vm.vmid).links if spec is not None else ())}
    if not peers:
        return {}
    try:
        return {"links": link_facts.facts(settings, peers)}
    except AgentError as err:
        return {"links_problem": str(err)}


def _read_ovs(settings: Settings):
    try:
        with Ovsdb(settings.ovsdb, min(settings.ovs_timeout, OVS_TIMEOUT)) as db:
            return db.snapshot(), ""
    except AgentError as err:
        return None, err.problem


def _cluster_vmids(settings: Settings) -> frozenset[int]:
    """Every VM id with a config on any node of the cluster."""
    return frozenset(int(p.stem) for p in settings.nodes_dir().glob("*/qemu-server/*.conf") if is_decimal(p.stem))


@dataclasses.dataclass
class DoctorWatch:
    """The doctor inside the service: cheap when nothing changed, each finding logged once."""

    interval: float = DOCTOR_INTERVAL
    findings: tuple[Finding, ...] = ()
    _files: tuple[str, ...] = (INTERFACES, DPKG_STATUS, VSWITCHD_ALTERNATIVE, COROSYNC)
    _key: object = None
    _when: float = float("-inf")
    _reported: frozenset[str] = frozenset()

    def update(self, settings: Settings, node: NodeState) -> int:
        """Run the doctor if anything it reads may have changed; the error-level count."""
        key = (file_stamps(settings, self._files), node.vms, node.spec, node.ovs, node.running)
        if key != self._key or time.monotonic() - self._when >= self.interval:
            self._when = time.monotonic()
            try:
                inp = observe(settings, node)
                self.findings = diagnose(inp)
            except Exception as err:  # noqa: BLE001 - the service must outlive a doctor that cannot look
                log.exception("the doctor failed: %s", err, extra={"result": "failed"})
                return error_count(self.findings)
            read = inp.network_file.files if inp.network_file else (INTERFACES,)
            # The folders too: a new file in interfaces.d changes its folder.
            self._files = tuple(dict.fromkeys([*read, *(str(PurePosixPath(f).parent) for f in read),
                                               DPKG_STATUS, VSWITCHD_ALTERNATIVE, COROSYNC]))
            self._key = (file_stamps(settings, self._files), node.vms, node.spec, node.ovs, node.running)
            self._log()
        return error_count(self.findings)

    def _log(self) -> None:
        now = {str(f): f for f in self.findings}
        for text, found in now.items():
            if text not in self._reported:
                level = logging.INFO if found.severity is Severity.INFO else logging.WARNING
                log.log(level, "doctor: %s", text, extra={"result": "doctor", "fields": _fields(found)})
        for text in sorted(self._reported - set(now)):
            log.info("doctor: resolved: %s", text, extra={"result": "resolved"})
        self._reported = frozenset(now)


def _fields(found: Finding) -> dict:
    return {"severity": found.severity.value, "subject": found.subject, "check": found.check}
