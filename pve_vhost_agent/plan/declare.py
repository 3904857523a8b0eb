"""The rules for declaring, changing and removing NICs in the cluster spec.

Pure: the current ClusterSpec and the VM's config in, the new ClusterSpec out, or an
error naming the problem and the fix. The CLI reads the files and writes the result.
"""

from __future__ import annotations


from typing import Iterable

from pve_vhost_agent.model import spec
from pve_vhost_agent.model.fields import NicChange
from pve_vhost_agent.plan import tapqinq as tapcheck
from pve_vhost_agent.errors import ConfigConflict, NotFound, SpecError
from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig
from pve_vhost_agent.formats.vmlayout import NetDevice, net_devices


def vm_nets(config: VmConfig) -> dict[int, tuple[str, NetDevice]]:
    """Every netN the VM has now or gets at its next start: N -> (its config line, parsed)."""
    nets = {}
    for view in (config.section(MAIN), config.effective()):
        for index, device in net_devices(view).items():
            nets[index] = (f"net{index}: {view[f'net{index}']}", device)
    return nets


def add_nic(cluster: spec.ClusterSpec, vmid: int, index: int, change: NicChange, config: VmConfig,
            macs: Iterable[str] = ()) -> spec.ClusterSpec:
    """Declare a new vhost-user NIC `netN` of VM `vmid`; without --mac, the first of `macs`
    (random candidates) that no NIC of the cluster or the VM has."""
    nets = vm_nets(config)
    if index in nets:
        free = next((n for n in range(spec.MAX_NICS) if n not in nets and not cluster.entry(vmid, n)), None)
        hint = f", e.g. net{free}" if free is not None else ""
        raise ConfigConflict(f"VM {vmid} already has `{nets[index][0]}` in its config",
                             f"pick a free netN for the vhost-user NIC{hint}")
    _must_be_undeclared(cluster, vmid, index)
    values = dict(change.values)
    bridge = values.pop("bridge", None)
    if bridge is None:
        raise SpecError("a vhost-user NIC needs a bridge", "give --bridge <OVS bridge>")
    mac = _free_mac(cluster, vmid, values.pop("mac", None), nets, macs)
    nic = spec.VhostNic(vmid=vmid, index=index, bridge=bridge, mac=mac)
    return cluster.with_entry(NicChange(values, change.vlan).applied_to(nic))


def set_nic(cluster: spec.ClusterSpec, vmid: int, index: int, change: NicChange, config: VmConfig) -> spec.ClusterSpec:
    """Change the given fields of a declared vhost-user NIC."""
    nic = _vhost_entry(cluster, vmid, index)
    mac = change.values.get("mac")
    if mac is not None and spec.check_mac(mac) != nic.mac:
        _free_mac(cluster.without(vmid, index), vmid, mac, vm_nets(config))
    return cluster.with_entry(change.applied_to(nic))


def remove_nic(cluster: spec.ClusterSpec, vmid: int, index: int) -> spec.ClusterSpec:
    _vhost_entry(cluster, vmid, index)
    return cluster.without(vmid, index)


def set_tap_qinq(cluster: spec.ClusterSpec, vmid: int, index: int, qinq: spec.QinQ,
                 config: VmConfig) -> spec.ClusterSpec:
    """QinQ for Proxmox's own tap NIC `netN`: it must exist (at the next start) on a bridge,
    carry tag=<S-tag> and no trunks, with the firewall off (see tapcheck)."""
    entry = cluster.entry(vmid, index)
    if isinstance(entry, spec.LinkEnd):
        raise ConfigConflict(f"VM {vmid} net{index} is the end of a link to {entry.peer_end}",
                             f"QinQ is for Proxmox's own NICs; remove the link first (pve-vhost-agent link remove {entry.end})")
    if isinstance(entry, spec.VhostNic):
        raise ConfigConflict(f"VM {vmid} net{index} is declared as a vhost-user NIC",
                             f"set QinQ on it with `pve-vhost-agent nic set {vmid} net{index} --qinq <S-tag>`")
    effective = config.effective()
    device = net_devices(effective).get(index)
    if device is None:
        raise NotFound(f"VM {vmid} has no net{index} in its config",
                       f"QinQ applies to Proxmox's own NICs; add one with "
                       f"`qm set {vmid} --net{index} virtio,bridge=<OVS bridge>,tag={qinq.stag}` first")
    # The NIC must carry tag=<S-tag>: what pve-bridge plugs before post-start fails closed.
    tapcheck.check_nic(vmid, index, effective[f"net{index}"], qinq.stag)
    return cluster.with_entry(spec.TapQinQ(vmid, index, qinq))


def remove_tap_qinq(cluster: spec.ClusterSpec, vmid: int, index: int) -> spec.ClusterSpec:
    if not isinstance(cluster.entry(vmid, index), spec.TapQinQ):
        raise NotFound(f"VM {vmid} net{index} has no QinQ declared",
                       f"see what is declared with `pve-vhost-agent nic list {vmid}`")
    return cluster.without(vmid, index)


# --- helpers -------------------------------------------------------------------------


def _must_be_undeclared(cluster: spec.ClusterSpec, vmid: int, index: int) -> None:
    entry = cluster.entry(vmid, index)
    if isinstance(entry, spec.VhostNic):
        raise ConfigConflict(f"VM {vmid} net{index} is already declared as a vhost-user NIC",
                             f"change it with `pve-vhost-agent nic set {vmid} net{index} ...`, or pick another netN")
    if isinstance(entry, spec.TapQinQ):
        raise ConfigConflict(f"VM {vmid} net{index} already has QinQ declared for Proxmox's tap NIC",
                             f"remove it with `pve-vhost-agent qinq remove {vmid} net{index}`, or pick another netN")
    if isinstance(entry, spec.LinkEnd):
        raise ConfigConflict(f"VM {vmid} net{index} is the end of a link to {entry.peer_end}",
                             f"remove it with `pve-vhost-agent link remove {entry.end}`, or pick another netN")


def _vhost_entry(cluster: spec.ClusterSpec, vmid: int, index: int) -> spec.VhostNic:
    entry = cluster.entry(vmid, index)
    if isinstance(entry, spec.TapQinQ):
        raise ConfigConflict(f"VM {vmid} net{index} is Proxmox's tap NIC with QinQ, not a vhost-user NIC",
                             f"change it with `pve-vhost-agent qinq set {vmid} net{index} ...`")
    if isinstance(entry, spec.LinkEnd):
        raise ConfigConflict(f"VM {vmid} net{index} is the end of a link to {entry.peer_end}, not a vhost-user NIC",
                             f"links are changed with `pve-vhost-agent link remove {entry.end}` and `link add`")
    if entry is None:
        raise NotFound(f"VM {vmid} has no vhost-user NIC net{index} declared",
                       f"declare it with `pve-vhost-agent nic add {vmid} net{index} --bridge <bridge>`")
    return entry


def _free_mac(cluster: spec.ClusterSpec, vmid: int, wanted: str | None,
              nets: dict[int, tuple[str, NetDevice]], candidates: Iterable[str] = ()) -> str:
    """`wanted` if no NIC of the cluster spec or of the VM has it; else a new unused one."""
    vm_macs = {device.mac: n for n, (_line, device) in nets.items() if device.mac}
    if wanted is None:
        return spec.unused_mac(candidates, [n.mac for n in (*cluster.nics, *cluster.links)] + list(vm_macs))
    mac = spec.check_mac(wanted)
    for other in (*cluster.nics, *cluster.links):
        if other.mac == mac:
            raise SpecError(f"MAC {mac} is already used by VM {other.vmid} {other.name} in the spec",
                            "give another --mac, or leave it out to get a unique one")
    if mac in vm_macs:
        raise ConfigConflict(f"MAC {mac} is already used by net{vm_macs[mac]} of VM {vmid}",
                             "give another --mac, or leave it out to get a unique one")
    return mac
