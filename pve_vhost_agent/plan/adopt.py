"""Adopt what operators already run: hand-written vhost-user args and the patched-Network.pm
QinQ convention, turned into declarations. Pure: the VM's config and the cluster spec in,
the declarations, the new `args:` line and what changes out, or every refusal.

The TNSR recipe's line (VPP/TNSR serves the socket, QEMU connects and retries):

    -chardev socket,id=char1,path=/var/run/vpp/vm-100-0.sock,reconnect=2
    -netdev type=vhost-user,id=vm-100-0,chardev=char1,vhostforce=on
    -object memory-backend-file,id=mem1000,size=4096M,mem-path=/dev/shm,share=on
    -numa node,memdev=mem1000
    [-device virtio-net-pci,netdev=vm-100-0,mac=...,rx_queue_size=1024,tx_queue_size=1024]

Each vhost-user netdev becomes a declared NIC: backend `external` with its socket path
kept when QEMU was the client, `ovs` (the agent's socket folder, OVS-DPDK connects) when
QEMU served the socket; the MAC, queue sizes and queues of its device are kept (the guest
keeps its interface names), its netN is the one its PCI slot shows or the first free one.
The hand-written guest memory (backend, `-numa`, `-machine memory-backend=`) goes: the
agent's own plan replaces it. Every other word stays as written, in order.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from pve_vhost_agent.errors import AgentError, ConfigConflict
from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.formats.vmlayout import memory_layout, net_devices, parse_property_string
from pve_vhost_agent.model import spec
from pve_vhost_agent.model.names import MAX_NICS, nic_name, tap_device
from pve_vhost_agent.plan.args import nic_pci_slot
from pve_vhost_agent.plan.tapqinq import check_nic

# Chardev options the adopted NIC keeps a meaning for; any other is refused by name.
_CHARDEV_KEYS = {"backend", "id", "path", "server", "wait", "reconnect", "reconnect-ms"}
_NETDEV_KEYS = {"type", "id", "chardev", "vhostforce", "queues"}
_DEVICE_KEYS = {"driver", "id", "netdev", "mac", "bus", "addr", "rx_queue_size", "tx_queue_size", "mq", "vectors",
                "host_mtu"}
_MEMORY_BACKENDS = ("memory-backend-file", "memory-backend-memfd", "memory-backend-ram")


@dataclasses.dataclass(frozen=True)
class AdoptPlan:
    vmid: int
    nics: tuple[spec.VhostNic, ...] = ()
    tap_qinq: tuple[spec.TapQinQ, ...] = ()
    net_values: Mapping[str, str] = dataclasses.field(default_factory=dict)  # netN rewritten (patched QinQ)
    user_args: str | None = None  # the args line without the adopted words (None: no line left)
    notes: tuple[str, ...] = ()  # what changes, one line each
    refusals: tuple[str, ...] = ()  # what cannot be mapped, one line each: then nothing is written

    def __bool__(self) -> bool:
        """True when there is something to adopt."""
        return bool(self.nics or self.tap_qinq)


@dataclasses.dataclass
class _Found:
    """The words of one hand-written vhost-user NIC, by option."""

    netdev: qemuargs.OptionPair
    chardev: qemuargs.OptionPair | None = None
    device: qemuargs.OptionPair | None = None


def plan_adopt(vmid: int, config: VmConfig, cluster: spec.ClusterSpec, bridge: str,
               macs: Iterable[str], patched_qinq: bool = False) -> AdoptPlan:
    """What `adopt` would do for VM `vmid` (see the module's note). `macs` are random
    candidates for a NIC whose device gave none; `bridge` is the OVS bridge of adopted
    `ovs` NICs (a hand-written line does not name it)."""
    values = config.effective()
    line = values.get("args", "")
    try:
        tokens = qemuargs.split_args(line)
    except AgentError as err:
        return AdoptPlan(vmid, refusals=(str(err),))
    # The agent's own words (a VM adopted before, or declared NICs) are not the operator's.
    pairs = [p for p in qemuargs.option_pairs(tokens) if not qemuargs.is_agent_owned(p)]
    refusals: list[str] = []
    notes: list[str] = []
    found = _vhost_nics(pairs, refusals)
    memory, memory_words = _memory(vmid, pairs, values, refusals, notes)
    nics = _nics(vmid, found, values, cluster, bridge, macs, refusals, notes)
    tap_qinq, net_values = _patched(vmid, values, cluster, refusals, notes) if patched_qinq else ((), {})
    adopted = {id(t) for f in found for p in (f.netdev, f.chardev, f.device) if p for t in (p.option, p.value)}
    adopted |= memory_words
    kept = [t for t in tokens if id(t) not in adopted]
    user = " ".join(line[t.start:t.end] for t in kept) or None
    if memory:
        notes.append(memory)
    if not nics and not tap_qinq and not refusals:
        refusals.append(f"VM {vmid} has no hand-written vhost-user NIC in its args"
                        + ("" if patched_qinq else " (add --patched-qinq for NICs of the patched Network.pm)"))
    return AdoptPlan(vmid, tuple(nics), tuple(tap_qinq), net_values, user, tuple(notes), tuple(refusals))


def _vhost_nics(pairs: list[qemuargs.OptionPair], refusals: list[str]) -> list[_Found]:
    chardevs = {p.props.get("id"): p for p in pairs if p.kind == "chardev"}
    devices = {p.props.get("netdev"): p for p in pairs if p.kind == "device" and "netdev" in p.props}
    found = []
    for pair in pairs:
        if pair.kind != "netdev" or pair.props.get("type") != "vhost-user":
            continue
        props = pair.props
        item = _Found(pair, chardevs.get(props.get("chardev")), devices.get(props.get("id")))
        _unknown(pair, _NETDEV_KEYS, refusals)
        if item.chardev is None:
            refusals.append(f"`{pair.value.text}`: no -chardev with id={props.get('chardev')} in the args")
        else:
            _unknown(item.chardev, _CHARDEV_KEYS, refusals)
            if item.chardev.props.get("backend") != "socket" or not item.chardev.props.get("path"):
                refusals.append(f"`{item.chardev.value.text}`: a vhost-user chardev must be a unix socket with a path")
        if item.device is not None:
            _unknown(item.device, _DEVICE_KEYS, refusals)
        found.append(item)
    return found


def _unknown(pair: qemuargs.OptionPair, known: set[str], refusals: list[str]) -> None:
    for key in sorted(set(pair.props) - known):
        refusals.append(f"`-{pair.kind} {pair.value.text}`: option `{key}` has no place in a declared NIC; "
                        f"remove it from the args first if the NIC can do without it")


def _memory(vmid: int, pairs: list[qemuargs.OptionPair], values: Mapping[str, str], refusals: list[str],
            notes: list[str]) -> tuple[str, set[int]]:
    """The hand-written guest memory: a note on what replaces it, and its words."""
    backends = [p for p in pairs if p.kind == "object" and p.props.get("qom-type", "") in _MEMORY_BACKENDS]
    numa = [p for p in pairs if p.kind == "numa"]
    machine = [p for p in pairs if p.kind in ("machine", "M") and "memory-backend" in p.props]
    if len(backends) > 1:
        refusals.append(f"VM {vmid} args have {len(backends)} memory backends ("
                        + ", ".join(f"id={p.props.get('id')}" for p in backends) + "): which one is the guest's?")
    words = {id(t) for p in (*backends, *numa, *machine) for t in (p.option, p.value)}
    if not backends:
        return ("", words) if not numa else (f"-numa {numa[0].value.text} goes (the agent plans guest memory)", words)
    props = backends[0].props
    try:
        mib = memory_layout(values).memory_mib
    except AgentError as err:
        refusals.append(str(err))
        return "", words
    size = props.get("size", "")
    if _mib(size) != mib:
        refusals.append(f"the hand-written memory backend has size={size or '(none)'}, but the VM has memory: {mib} "
                        f"(MiB); make them agree first (qm set {vmid} --memory ...) so the guest keeps its memory")
    for pair in machine:
        if pair.props.get("memory-backend") != props.get("id"):
            refusals.append(f"`-machine {pair.value.text}` names a memory backend that is not in the args")
    path = props.get("mem-path", "")
    was = f"{props['qom-type']} on {path}" if path else props.get("qom-type", "")
    note = f"guest memory: the hand-written {was} (+ {len(numa)} -numa) is replaced by the agent's own plan"
    if path.startswith("/dev/shm"):
        note += "; a memfd backend needs no /dev/shm room, so its resize is no longer needed"
    if props.get("share") != "on":
        note += " (it was not shared, so vhost-user could not have worked)"
    return note, words


def _mib(size: str) -> int | None:
    units = {"M": 1, "G": 1024, "T": 1024 * 1024}
    number, unit = (size[:-1], size[-1].upper()) if size and size[-1].upper() in units else (size, "")
    if not spec.is_decimal(number):
        return None
    value = int(number)
    return value * units[unit] if unit else value // (1024 * 1024)  # a bare number is bytes


def _nics(vmid: int, found: list[_Found], values: Mapping[str, str], cluster: spec.ClusterSpec, bridge: str,
          macs: Iterable[str], refusals: list[str], notes: list[str]) -> list[spec.VhostNic]:
    taken = set(net_devices(values)) | {e.index for e in (*cluster.nics, *cluster.tap_qinq) if e.vmid == vmid}
    used_macs = [n.mac for n in cluster.nics] + [d.mac for d in net_devices(values).values() if d.mac]
    nics = []
    for item in found:
        if item.chardev is None:
            continue
        index = _index(item.device, taken)
        if index is None:
            refusals.append(f"VM {vmid} has no free netN left for `{item.netdev.value.text}`")
            continue
        taken.add(index)
        try:
            nic = _nic(vmid, index, item, bridge, macs, used_macs)
        except AgentError as err:
            refusals.append(f"`{item.netdev.value.text}`: {err}")
            continue
        used_macs.append(nic.mac)
        nics.append(nic)
        notes.append(f"{nic.name}: {nic.describe()}" + _socket_note(item, nic))
    return nics


def _index(device: qemuargs.OptionPair | None, taken: set[int]) -> int | None:
    """The netN whose reserved PCI slot the device sits in, when free; else the first free."""
    if device is not None:
        slot = qemuargs.pci_slot(device.props, "pci.0")
        for index in range(MAX_NICS):
            if nic_pci_slot(index) == slot and index not in taken:
                return index
    return next((i for i in range(1, MAX_NICS) if i not in taken), None)


def _nic(vmid: int, index: int, item: _Found, bridge: str, macs: Iterable[str], used: list[str]) -> spec.VhostNic:
    chardev = item.chardev.props
    server = chardev.get("server") in ("on", "")  # QEMU listens: OVS-DPDK (a dpdkvhostuserclient) connects
    device = item.device.props if item.device else {}
    mac = device.get("mac") or spec.unused_mac(macs, used)
    fields = dict(vmid=vmid, index=index, bridge=bridge, mac=mac,
                  backend=spec.Backend.OVS if server else spec.Backend.EXTERNAL,
                  socket=None if server else chardev["path"])
    if item.netdev.props.get("queues"):
        fields["queues"] = _number(item.netdev.props["queues"], "queues")
    for key in ("rx_queue_size", "tx_queue_size"):
        if key in device:
            fields[key] = _number(device[key], key)
    if "host_mtu" in device:
        fields["mtu"] = _number(device["host_mtu"], "host_mtu")
    return spec.VhostNic(**fields)


def _number(text: str, what: str) -> int:
    if not spec.is_decimal(text):
        raise ConfigConflict(f"{what}={text[:20]} is not a number", "fix it in the args first")
    return int(text)


def _socket_note(item: _Found, nic: spec.VhostNic) -> str:
    if nic.backend is spec.Backend.EXTERNAL:
        return f"; QEMU keeps connecting to {nic.socket}"
    return (f"; its socket moves from {item.chardev.props['path']} into the agent's folder and the agent makes "
            f"the OVS port: remove your own port for {item.chardev.props['path']} after the next start")


def _patched(vmid: int, values: Mapping[str, str], cluster: spec.ClusterSpec, refusals: list[str],
             notes: list[str]) -> tuple[tuple[spec.TapQinQ, ...], dict[str, str]]:
    """NICs with tag + trunks read as the patched Network.pm reads them: dot1q-tunnel with
    S-tag = tag and C-VLANs = trunks. Unpatched Proxmox reads the same line as
    native-untagged trunking, hence an option."""
    entries, rewritten = [], {}
    for index, device in net_devices(values).items():
        if device.tag is None or not device.trunks or cluster.entry(vmid, index) is not None:
            continue
        key = nic_name(index)
        try:
            qinq = spec.QinQ(device.tag, spec.parse_vlan_list(device.trunks, "trunks"))
            value = ",".join(f"{k}={v}" if v else k for k, v in parse_property_string(values[key]).items()
                             if k != "trunks")
            check_nic(vmid, index, value, device.tag)  # what `qinq set` requires: tag only, firewall off
        except AgentError as err:
            refusals.append(f"{key}: {err}")
            continue
        entries.append(spec.TapQinQ(vmid, index, qinq))
        rewritten[key] = value
        notes.append(f"{key}: the patched convention tag={device.tag},trunks={device.trunks} becomes QinQ on "
                     f"{tap_device(vmid, index)} (S-tag {device.tag}, C-VLANs {spec.format_vlan_list(qinq.cvlans)}); "
                     f"the NIC keeps tag={device.tag} only")
    return tuple(entries), rewritten
