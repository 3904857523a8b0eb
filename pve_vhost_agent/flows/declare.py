"""`nic add|set|remove|list` and `qinq set|remove`: declare NICs, and follow on an enabled VM.

A declaration changes the cluster-wide spec (under the cluster lock). On a VM with the
agent's hookscript it then brings the args line in step at once, makes the socket
folders, and on a running VM changes its OVS ports as far as its QEMU can take now (the
rest is named as taking effect at its next start). A spec the VM could not start with
is refused before anything is written, and so is one whose args could not be written
(Proxmox's `lock:`, a config over pmxcfs's 1 MiB). Spec and args change together or not
at all: when the args write still fails (a task took the VM's lock meanwhile), the
declaration is taken back, so the command run again does it all.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

from pve_vhost_agent.adapters import pvefs, qemu
from pve_vhost_agent.adapters.specstore import SpecUpdate, load_spec, migrate_spec, update_spec
from pve_vhost_agent.adapters.vmstore import VmLocation, check_writable, find_vm
from pve_vhost_agent.errors import AgentError, NotFound, OvsUnavailable
from pve_vhost_agent.flows.enable import make_socket_folders
from pve_vhost_agent.flows.running import follow_running_vm
from pve_vhost_agent.flows.vmargs import VmArgs, apply_vm_args, sync_for, vm_args
from pve_vhost_agent.formats import datacenter, specfile
from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig
from pve_vhost_agent.formats.vmlayout import net_devices
from pve_vhost_agent.model import spec
from pve_vhost_agent.model.fields import NicChange
from pve_vhost_agent.model.names import is_agent_hook
from pve_vhost_agent.plan import declare
from pve_vhost_agent.settings import Settings

# rule(cluster, vmid, index, the VM's config or None) -> the new cluster spec
Rule = Callable[[spec.ClusterSpec, int, int, "VmConfig | None"], spec.ClusterSpec]


@dataclasses.dataclass(frozen=True)
class Declared:
    """What a declaration did: the spec before and after, the entry, and what followed."""

    vmid: int
    index: int
    update: SpecUpdate
    dry_run: bool
    args: VmArgs | None = None  # the VM's args after following (an enabled VM)
    lines: tuple[str, ...] = ()  # what followed, one line each (folders, running ports, next step)

    @property
    def entry(self) -> spec.VhostNic | spec.TapQinQ | None:
        return self.update.after.entry(self.vmid, self.index)

    @property
    def before(self) -> spec.VhostNic | spec.TapQinQ | None:
        return self.update.before.entry(self.vmid, self.index)


def add_nic(settings: Settings, vmid: int, nic: str, change: NicChange, dry_run: bool) -> Declared:
    macs = random_macs(settings)
    return _declare(settings, vmid, nic, lambda c, v, i, config: declare.add_nic(c, v, i, change, config, macs), dry_run)


def random_macs(settings: Settings) -> Iterator[str]:
    """Endless random MACs as Proxmox makes them, with the cluster's mac_prefix if it has one."""
    text = pvefs.read_text(settings.pve_dir / "datacenter.cfg")
    prefix = datacenter.mac_prefix(text) if text else None
    while True:
        yield spec.random_mac(os.urandom(6), prefix)


def set_nic(settings: Settings, vmid: int, nic: str, change: NicChange, dry_run: bool) -> Declared:
    return _declare(settings, vmid, nic, lambda c, v, i, config: declare.set_nic(c, v, i, change, config), dry_run)


def set_tap_qinq(settings: Settings, vmid: int, nic: str, qinq: spec.QinQ, dry_run: bool) -> Declared:
    return _declare(settings, vmid, nic, lambda c, v, i, config: declare.set_tap_qinq(c, v, i, qinq, config), dry_run)


def remove_nic(settings: Settings, vmid: int, nic: str, dry_run: bool) -> Declared:
    """The VM need not exist any more."""
    return _declare(settings, vmid, nic, lambda c, v, i, _config: declare.remove_nic(c, v, i), dry_run, needs_vm=False)


def remove_tap_qinq(settings: Settings, vmid: int, nic: str, dry_run: bool) -> Declared:
    return _declare(settings, vmid, nic, lambda c, v, i, _config: declare.remove_tap_qinq(c, v, i), dry_run,
                    needs_vm=False)


def migrate(settings: Settings) -> int:
    """Split the single spec file of earlier versions into per-VM files (the package's
    postinst runs this); the number of VMs moved."""
    return migrate_spec(settings)


def list_nics(settings: Settings, vmid: int | None) -> list[spec.VhostNic | spec.TapQinQ]:
    cluster = load_spec(settings)
    return sorted((e for e in (*cluster.nics, *cluster.tap_qinq) if vmid is None or e.vmid == vmid),
                  key=lambda e: e.key)


def entry_row(settings: Settings, entry: spec.VhostNic | spec.TapQinQ) -> dict:
    """One entry as plain JSON values; the same keys for both kinds."""
    vlan = entry.vlan if isinstance(entry, spec.VhostNic) else spec.VlanPolicy(qinq=entry.qinq)
    row = {
        "vmid": entry.vmid, "nic": entry.name,
        "kind": specfile.VHOST if isinstance(entry, spec.VhostNic) else specfile.QINQ,
        "backend": None, "bridge": None, "mac": None,
        "vlan_mode": vlan.mode or None, "tag": vlan.tag, "trunks": list(vlan.trunks),
        "qinq": vlan.qinq.stag if vlan.qinq else None,
        "cvlans": list(vlan.qinq.cvlans) if vlan.qinq else [],
        "ethertype": vlan.qinq.ethertype.value if vlan.qinq else None,
        "queues": None, "rx_queue_size": None, "tx_queue_size": None, "mtu": None,
        "port": entry.port_name, "socket": None, "summary": entry.describe(),
    }
    if isinstance(entry, spec.VhostNic):
        row.update(backend=entry.backend.value, bridge=entry.bridge, mac=entry.mac, queues=entry.queues,
                   rx_queue_size=entry.rx_queue_size, tx_queue_size=entry.tx_queue_size, mtu=entry.mtu,
                   socket=str(entry.socket_path(settings.socket_dirs())))
    else:
        row.update(_tap_facts(settings, entry))
    return row


# --- helpers --------------------------------------------------------------------------


def _declare(settings: Settings, vmid: int, nic: str, rule: Rule, dry_run: bool, needs_vm: bool = True) -> Declared:
    index = spec.parse_nic_name(nic)
    spec.check_vmid(vmid)
    config = find_vm(settings, vmid).config if needs_vm else None
    enabled = _enabled(settings, vmid)
    # Asked before the cluster lock: nothing slow (starting QEMU) runs while it is held.
    version, no_qemu = None, None
    if enabled is not None:
        try:
            version = qemu.installed_version()
        except AgentError as err:  # only args with vhost-user NICs depend on QEMU (QinQ, links: not)
            no_qemu = err

    def change(cluster: spec.ClusterSpec) -> spec.ClusterSpec:
        after = rule(cluster, vmid, index, config)
        if no_qemu is not None and after.for_vm(vmid).nics:
            raise no_qemu
        if enabled is not None:  # a spec the VM could not start with, or whose args cannot be written, is not written
            sync = sync_for(settings, after.for_vm(vmid), enabled.config, bool(enabled.running), version)
            if not sync.in_sync:
                check_writable(enabled, sync.config_after)
        return after

    if dry_run:
        before = load_spec(settings)
        update = SpecUpdate(before, change(before))
    else:
        update = update_spec(settings, change)
    declared = Declared(vmid, index, update, dry_run)
    if update.changed:
        return _follow(settings, declared, enabled)
    if enabled is not None and not dry_run:
        # Declared already, by a run cut short before its args: this run brings them in step.
        return dataclasses.replace(declared, args=apply_vm_args(settings, vmid))
    return declared


def _enabled(settings: Settings, vmid: int) -> VmLocation | None:
    """The VM, when it lives here and has the agent's hookscript: its args follow its spec."""
    try:
        location = find_vm(settings, vmid)
    except NotFound:
        return None
    hook = location.config.section(MAIN).get("hookscript")
    return location if location.local and is_agent_hook(hook) else None


def _follow(settings: Settings, declared: Declared, enabled: VmLocation | None) -> Declared:
    """Bring an enabled VM's args in step at once, and a running one's OVS ports (what its
    QEMU can take now; the rest is named as taking effect at the next start); otherwise
    say how to enable it."""
    vmid, dry_run, update = declared.vmid, declared.dry_run, declared.update
    if enabled is None:
        next_step = () if dry_run else (f"next: `pve-vhost-agent enable {vmid}` sets the hookscript and writes the args line",)
        return dataclasses.replace(declared, lines=next_step)
    args = vm_args(settings, vmid, update.after) if dry_run else _write_args(settings, declared)
    lines = [] if dry_run else make_socket_folders(settings, update.after.for_vm(vmid))
    before, after = update.before.for_vm(vmid), update.after.for_vm(vmid)
    if enabled.running and (before.ovs_nics or after.ovs_nics):
        try:
            lines += follow_running_vm(settings, after, dry_run)
        except OvsUnavailable as err:
            # The spec and args are written (what the next start needs); say who catches up.
            raise OvsUnavailable(f"VM {vmid}: spec and args written, but its running ports were not changed: {err}",
                                 "the service applies the change once Open vSwitch answers again") from err
    return dataclasses.replace(declared, args=args, lines=tuple(lines))


def _write_args(settings: Settings, declared: Declared) -> VmArgs:
    """The VM's args after its spec; when they cannot be written, the declaration is taken
    back (the VM keeps the spec its args were written for) and the error says so."""
    vmid = declared.vmid
    try:
        return apply_vm_args(settings, vmid)
    except AgentError as err:
        try:
            _take_back(settings, declared)
        except AgentError as undo:
            raise type(err)(f"VM {vmid}: the spec was changed but its args were not ({err.problem}), and taking the "
                            f"spec back failed too ({undo.problem})",
                            f"run `pve-vhost-agent apply {vmid}` once this is solved: {err.fix or undo.fix}") from err
        raise type(err)(f"{err.problem} (nothing was changed: the declaration was taken back)", err.fix) from err


def _take_back(settings: Settings, declared: Declared) -> None:
    """Put VM `declared.vmid`'s NIC back as it was, unless it was changed again since."""
    vmid, index, ours, previous = declared.vmid, declared.index, declared.entry, declared.before

    def back(cluster: spec.ClusterSpec) -> spec.ClusterSpec:
        if cluster.entry(vmid, index) != ours:
            return cluster  # declared again meanwhile: that is not ours to undo
        return cluster.with_entry(previous) if previous is not None else cluster.without(vmid, index)

    update_spec(settings, back)


def _tap_facts(settings: Settings, entry: spec.TapQinQ) -> dict:
    """Bridge and MAC of a tap NIC, from its VM config (none when the VM is gone)."""
    try:
        config = find_vm(settings, entry.vmid).config
    except NotFound:
        return {}
    device = net_devices(config.effective()).get(entry.index)
    return {"bridge": device.bridge or None, "mac": device.mac or None} if device else {}
