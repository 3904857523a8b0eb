"""Plan the agent's part of a VM's `args:` line: vhost-user NICs, shared guest memory, link ends.

Pure: the VM's spec, its effective Proxmox config (pending values applied), the installed
QEMU version and the socket folders in; the QEMU arguments and a note on why each part is
there out. Same inputs, same args, in the same order.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Mapping

from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.model import names
from pve_vhost_agent.errors import ConfigConflict, MemoryLayoutError, SpecError
from pve_vhost_agent.model.spec import Backend, LinkEnd, VhostNic, VmSpec
from pve_vhost_agent.formats.vmlayout import MemoryLayout, hotplug_items, machine_type, memory_layout, net_devices

# QEMU 9.2 renamed the client socket's `reconnect` (seconds) to `reconnect-ms`.
RECONNECT_MS_SINCE = (9, 2, 0)
RECONNECT_SECONDS = 1
# A unix socket path must fit sockaddr_un.sun_path (108 bytes with the final NUL).
MAX_SOCKET_PATH = 107
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./:-]+$")


@dataclasses.dataclass(frozen=True)
class ArgsPlan:
    """The agent-owned QEMU arguments for one VM, and why each part is there."""

    args: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def nic_pci_slot(index: int) -> tuple[str, int]:
    """The PCI bus and slot qemu-server reserves for `netN` (QemuServer/PCI.pm)."""
    if index < 6:
        return "pci.0", 0x12 + index
    return "pci.1", index - 5


def plan_args(
    vm: VmSpec,
    config: Mapping[str, str],
    qemu_version: tuple[int, int, int],
    socket_dirs: Mapping[Backend, Path],
) -> ArgsPlan:
    """The args the agent owns for `vm`, or a refusal (ConfigConflict, MemoryLayoutError)."""
    if not vm.nics and not vm.links:
        return ArgsPlan((), ("no vhost-user NICs: the agent adds nothing to args",))
    if config.get("template", "").strip() not in ("", "0"):
        # qemu-server starts a template (for backups only) from a minimal config without
        # args; agent args there would only be copied, stale, into every clone.
        return ArgsPlan((), ("template: Proxmox drops args when it starts a template, so the agent adds none",))
    nics = tuple(sorted((*vm.nics, *vm.links), key=lambda nic: nic.index))
    _check_nics(vm.vmid, nics, config)
    if vm.nics:
        args, notes = _plan_memory(vm.vmid, memory_layout(config), config)
    else:
        args, notes = (), ("memory: nothing added; link ends need no shared guest memory",)
    for nic in nics:
        nic_args, nic_notes = (_plan_link_end(nic) if isinstance(nic, LinkEnd)
                               else _plan_nic(nic, qemu_version, socket_dirs))
        args += nic_args
        notes += nic_notes
    qemuargs.check_agent_args(args)
    root_bus = "pcie.0" if machine_type(config) == "q35" else "pci.0"
    qemuargs.check_user_args(config.get("args", ""), args, vm.vmid, root_bus)
    return ArgsPlan(args, notes)


def _check_nics(vmid: int, nics: tuple[VhostNic | LinkEnd, ...], config: Mapping[str, str]) -> None:
    """The same rules for vhost-user NICs and link ends: this VM's, each netN once, none on
    a Proxmox NIC's index or MAC; only the words (what it is, how to fix it) differ."""
    proxmox_nics = net_devices(config)
    seen: set[int] = set()
    for nic in nics:
        if isinstance(nic, LinkEnd):
            what, kind = f"link end {nic.end}", f"the link end {nic.end}"
            move = (f"remove the link (pve-vhost-agent link remove {nic.end}) and add it on a free netN, or remove "
                    f"the Proxmox NIC (qm set {vmid} --delete {nic.name})")
        else:
            what, kind = f"NIC {nic.name} of VM {nic.vmid}", "a vhost-user NIC"
            move = (f"give the vhost-user NIC a free index (pve-vhost-agent nic remove {vmid} {nic.name}, then nic add "
                    f"{vmid} netM ...) or remove the Proxmox NIC (qm set {vmid} --delete {nic.name})")
        if nic.vmid != vmid:
            raise SpecError(f"{what} is in the spec of VM {vmid}", "this is a bug: report it")
        if nic.index in seen:
            raise SpecError(f"VM {vmid} {nic.name} is declared twice", "remove one of the entries from the spec file")
        seen.add(nic.index)
        if nic.index in proxmox_nics:
            raise ConfigConflict(f"{nic.name} of VM {vmid} is both a Proxmox NIC in the VM config and {kind} in the spec",
                                 move)
        for other in proxmox_nics.values():
            if other.mac and other.mac == nic.mac:
                if isinstance(nic, LinkEnd):
                    raise ConfigConflict(f"MAC {nic.mac} of link end {nic.end} is also the MAC of Proxmox NIC "
                                         f"net{other.index} of VM {vmid}",
                                         f"give that Proxmox NIC another MAC (qm set {vmid} --net{other.index} ...)")
                raise ConfigConflict(
                    f"MAC {nic.mac} of vhost-user {nic.name} is also the MAC of Proxmox NIC net{other.index} of VM {vmid}",
                    f"give the vhost-user NIC another MAC (pve-vhost-agent nic set {vmid} {nic.name} --mac ...)",
                )


def _plan_memory(vmid: int, layout: MemoryLayout, config: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Shared guest memory, or a refusal. Checked in this order; the first problem is reported."""
    if layout.memory_hotplug:
        rest = [item for item in hotplug_items(config) if item != "memory"]
        raise MemoryLayoutError(
            f"VM {vmid} has memory hotplug on; hot-plugged DIMMs are not shared with a vhost-user backend",
            f"turn it off: qm set {vmid} --hotplug {','.join(rest) or '0'}",
        )
    if layout.hugepages and not layout.numa:
        raise MemoryLayoutError(
            f"VM {vmid} has hugepages: {layout.hugepages} but numa is off, which Proxmox refuses to start",
            f"turn numa on: qm set {vmid} --numa 1",
        )
    if layout.numa and not layout.proxmox_shares_memory:
        raise MemoryLayoutError(
            f"VM {vmid} has numa on without hugepages: Proxmox then gives it memory-backend-ram, "
            "which a vhost-user backend cannot share",
            f"add hugepages (qm set {vmid} --hugepages 2) or turn numa off (qm set {vmid} --numa 0)",
        )
    if layout.balloon:
        raise MemoryLayoutError(
            f"VM {vmid} has ballooning on, which does not work with guest memory shared with a vhost-user backend",
            f"set `balloon: 0`: qm set {vmid} --balloon 0",
        )
    if layout.virtiofs:
        return (), ("memory: nothing added; Proxmox's virtiofs memfd backend already shares guest memory",)
    if layout.numa:
        return (), (
            f"memory: nothing added; Proxmox's hugepages backend (numa: 1, hugepages: {layout.hugepages}) "
            "already shares guest memory",
        )
    mib = layout.memory_mib
    return (
        "-object", f"memory-backend-memfd,id={names.ARGS_MEMORY_ID},size={mib}M,share=on",
        "-machine", qemuargs.MACHINE_MEMORY,
    ), (
        f"memory: memfd backend of {mib} MiB shared with the vhost-user backend, because numa is off "
        "(Proxmox would give the guest unshared RAM)",
    )


def _safe(value: str, what: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise SpecError(
            f"{what} {value!r} has a character that Proxmox's split of args or QEMU would read differently",
            "use only A-Z a-z 0-9 _ . / : - there (for socket paths: a --root without blanks, commas or quotes)",
        )
    return value


def _plan_nic(nic: VhostNic, qemu_version: tuple[int, int, int],
              socket_dirs: Mapping[Backend, Path]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    ident = names.args_nic_id(nic.index)
    path = _safe(str(nic.socket_path(socket_dirs)), "socket path")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise SpecError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes", "use a shorter --root folder")
    if nic.backend is Backend.OVS:
        role = "server=on,wait=off"
        role_note = "QEMU listens and OVS-DPDK connects (backend ovs, dpdkvhostuserclient port)"
    elif qemu_version >= RECONNECT_MS_SINCE:
        role = f"reconnect-ms={RECONNECT_SECONDS * 1000}"
        role_note = (f"QEMU connects to the external vhost-user server and retries every {RECONNECT_SECONDS} s "
                     f"(reconnect-ms, QEMU {_version(qemu_version)} >= 9.2)")
    else:
        role = f"reconnect={RECONNECT_SECONDS}"
        role_note = (f"QEMU connects to the external vhost-user server and retries every {RECONNECT_SECONDS} s "
                     f"(reconnect, QEMU {_version(qemu_version)} < 9.2)")
    netdev = f"type=vhost-user,id={ident},chardev={ident},vhostforce=on"
    bus, slot = nic_pci_slot(nic.index)
    mac = _safe(nic.mac, "MAC")
    device = (f"virtio-net-pci,id={ident},netdev={ident},mac={mac},bus={bus},addr=0x{slot:x},"
              f"rx_queue_size={nic.rx_queue_size},tx_queue_size={nic.tx_queue_size}")
    notes = [
        f"{nic.name}: socket {path}; {role_note}",
        f"{nic.name}: virtio-net-pci with MAC {mac} at {bus} addr 0x{slot:x}, the slot Proxmox reserves for "
        f"{nic.name}; rx/tx queue size {nic.rx_queue_size}/{nic.tx_queue_size}",
    ]
    if nic.queues > 1:
        netdev += f",queues={nic.queues}"
        device += f",mq=on,vectors={2 * nic.queues + 2}"
        notes.append(f"{nic.name}: {nic.queues} queue pairs (mq=on, vectors={2 * nic.queues + 2})")
    if nic.mtu is not None:
        device += f",host_mtu={nic.mtu}"
        notes.append(f"{nic.name}: MTU {nic.mtu} announced to the guest (host_mtu)")
    args = ("-chardev", f"socket,id={ident},path={path},{role}", "-netdev", netdev, "-device", device)
    return args, tuple(notes)


def _plan_link_end(end: LinkEnd) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The link end's device in its netN slot, on a QEMU hub of its own: the agent adds the
    UDP socket to that hub once QEMU runs (plan/links.py), so no address is in the args."""
    ident = names.args_nic_id(end.index)
    hub = names.link_hub(end.index)
    bus, slot = nic_pci_slot(end.index)
    mac = _safe(end.mac, "MAC")
    device = (f"virtio-net-pci,id={ident},netdev={ident},mac={mac},bus={bus},addr=0x{slot:x},"
              f"host_mtu={end.mtu}")
    notes = (
        f"{end.name}: link to {end.peer_end}: virtio-net-pci with MAC {mac} at {bus} addr 0x{slot:x}, the slot "
        f"Proxmox reserves for {end.name}, MTU {end.mtu} announced to the guest (host_mtu)",
        f"{end.name}: on QEMU hub {hub}; once QEMU runs the agent adds the UDP socket of port {end.port}, "
        f"connected to port {end.peer_port} of {end.peer_end}",
    )
    return ("-netdev", f"type=hubport,id={ident},hubid={hub}", "-device", device), notes


def _version(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))
