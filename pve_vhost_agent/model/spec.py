"""The declared network spec of VMs: vhost-user NICs and QinQ on Proxmox's own tap NICs.

Pure values and validation only. Every value that ends up inside a QEMU option string or
an OVS name is checked against a strict character set here: a comma, `=`, quote, space
or newline would let a spec inject QEMU options or split differently in Proxmox's
shell-style parse of `args:`, so such a value is refused, never escaped.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from pathlib import PurePosixPath
from typing import Iterable, Mapping

from pve_vhost_agent.errors import SpecError
from pve_vhost_agent.model import names
from pve_vhost_agent.model.names import MAX_NICS

VLAN_MIN, VLAN_MAX = 1, 4094
MTU_MIN, MTU_MAX = 68, 9710  # 9710: the largest MTU OVS-DPDK accepts on a vhost-user port
QUEUES_MAX = 64  # Proxmox's own limit for `queues=`
QUEUE_SIZES = (256, 512, 1024)  # QEMU accepts powers of two from 256 to 1024
DEFAULT_QUEUE_SIZE = 1024  # the TNSR recipe's advice for vhost-user NICs

# Linux interface names: at most 15 characters. OVS port and bridge names become
# interface names, and they end up in QEMU option strings: keep them to a safe set.
# Patterns are kept as text: re compiles (and caches) each at its first use.
_IFNAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}"
_MAC = r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}"


class Backend(str, enum.Enum):
    """Who serves the vhost-user socket of a NIC."""

    OVS = "ovs"  # OVS-DPDK dpdkvhostuserclient port: QEMU is the socket server
    EXTERNAL = "external"  # a vhost-user server the agent does not manage (VPP/TNSR)


class EtherType(str, enum.Enum):
    """Outer tag protocol of a dot1q-tunnel port (OVS `other_config:qinq-ethtype`)."""

    DOT1AD = "802.1ad"  # TPID 0x88a8, OVS's default
    DOT1Q = "802.1q"  # TPID 0x8100


@dataclasses.dataclass(frozen=True)
class QinQ:
    """A dot1q-tunnel port: service VLAN `stag`, allowed customer VLANs (empty: all)."""

    stag: int
    cvlans: tuple[int, ...] = ()
    ethertype: EtherType = EtherType.DOT1AD

    def __post_init__(self) -> None:
        check_vlan(self.stag, "S-tag")
        for vid in self.cvlans:
            check_vlan(vid, "customer VLAN")


@dataclasses.dataclass(frozen=True)
class VlanPolicy:
    """At most one of: access `tag`, `trunks`, or `qinq` (dot1q-tunnel). None: all VLANs."""

    tag: int | None = None
    trunks: tuple[int, ...] = ()
    qinq: QinQ | None = None

    def __post_init__(self) -> None:
        chosen = [n for n, v in (("tag", self.tag), ("trunks", self.trunks), ("qinq", self.qinq)) if v]
        if len(chosen) > 1:
            raise SpecError(
                f"a NIC can have only one VLAN mode, got {' and '.join(chosen)}",
                "choose one of --tag, --trunks or --qinq",
            )
        if self.tag is not None:
            check_vlan(self.tag, "VLAN tag")
        for vid in self.trunks:
            check_vlan(vid, "trunk VLAN")

    def describe(self) -> str:
        """In an operator's words: `S-tag 950 (802.1ad), C-VLANs 10,20`, `VLAN tag 10`."""
        if self.qinq:
            text = f"S-tag {self.qinq.stag} ({self.qinq.ethertype.value})"
            return text + (f", C-VLANs {format_vlan_list(self.qinq.cvlans)}" if self.qinq.cvlans else "")
        if self.tag is not None:
            return f"VLAN tag {self.tag}"
        if self.trunks:
            return f"trunks {format_vlan_list(self.trunks)}"
        return "all VLANs"

    @property
    def mode(self) -> str:
        """The OVS `vlan_mode` this policy asks for ('' leaves OVS's default)."""
        if self.qinq:
            return "dot1q-tunnel"
        if self.tag is not None:
            return "access"
        if self.trunks:
            return "trunk"
        return ""


@dataclasses.dataclass(frozen=True)
class NicEntry:
    """What every declared NIC has: its VM and its index N (the VM config's `netN`)."""

    vmid: int
    index: int

    def __post_init__(self) -> None:
        check_vmid(self.vmid)
        check_nic_index(self.index)

    @property
    def name(self) -> str:
        return names.nic_name(self.index)

    @property
    def key(self) -> tuple[int, int]:
        return (self.vmid, self.index)


@dataclasses.dataclass(frozen=True)
class VhostNic(NicEntry):
    """A vhost-user NIC of a VM."""

    bridge: str
    mac: str
    backend: Backend = Backend.OVS
    vlan: VlanPolicy = VlanPolicy()
    queues: int = 1
    rx_queue_size: int = DEFAULT_QUEUE_SIZE
    tx_queue_size: int = DEFAULT_QUEUE_SIZE
    mtu: int | None = None
    socket: str | None = None  # backend external: where the server listens (default: the agent's folder)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ifname(self.bridge, "bridge")
        if self.socket is not None:
            if self.backend is not Backend.EXTERNAL:
                raise SpecError(f"{self.name} of VM {self.vmid}: --socket is for the external backend only (the agent "
                                "keeps the ovs backend's sockets in its own folder)", "add --backend external, or drop --socket")
            check_socket_path(self.socket)
        object.__setattr__(self, "mac", check_mac(self.mac))
        if not 1 <= self.queues <= QUEUES_MAX:
            raise SpecError(f"queues {self.queues} is outside 1-{QUEUES_MAX}", "give --queues between 1 and 64")
        for name, size in (("rx", self.rx_queue_size), ("tx", self.tx_queue_size)):
            if size not in QUEUE_SIZES:
                raise SpecError(
                    f"{name} queue size {size} is not one of {', '.join(map(str, QUEUE_SIZES))}",
                    f"use {DEFAULT_QUEUE_SIZE} (the default) or another listed size",
                )
        if self.mtu is not None and not MTU_MIN <= self.mtu <= MTU_MAX:
            raise SpecError(f"MTU {self.mtu} is outside {MTU_MIN}-{MTU_MAX}", f"give --mtu between {MTU_MIN} and {MTU_MAX}")

    @property
    def port_name(self) -> str:
        """The OVS port (and interface) name: like Proxmox's tap names, `vhu<vmid>i<N>`."""
        return names.vhost_port(self.vmid, self.index)

    def describe(self) -> str:
        parts = [f"vhost-user on bridge {self.bridge}", f"backend {self.backend.value}", f"MAC {self.mac}",
                 self.vlan.describe()]
        if self.queues != 1:
            parts.append(f"{self.queues} queues")
        if self.mtu is not None:
            parts.append(f"MTU {self.mtu}")
        return ", ".join(parts)

    @property
    def socket_name(self) -> str:
        """The socket file name, as in the TNSR recipe: `vm-<vmid>-<N>.sock`."""
        return names.socket_name(self.vmid, self.index)

    def socket_path(self, socket_dirs: Mapping[Backend, PurePosixPath]) -> PurePosixPath:
        """Where the NIC's socket is: the one given, else in its backend's folder."""
        return PurePosixPath(self.socket) if self.socket else PurePosixPath(socket_dirs[self.backend]) / self.socket_name


@dataclasses.dataclass(frozen=True)
class TapQinQ(NicEntry):
    """QinQ for one of Proxmox's own tap NICs (`netN` in the VM config, on an OVS bridge)."""

    qinq: QinQ

    @property
    def port_name(self) -> str:
        """Proxmox's tap device for this NIC (pve-common names it so)."""
        return names.tap_device(self.vmid, self.index)

    def describe(self) -> str:
        return f"QinQ on {self.port_name}, {VlanPolicy(qinq=self.qinq).describe()}"


# VM-to-VM links: each end's UDP port comes from this range (outside Linux's ephemeral
# ports 32768-60999, Proxmox's VNC 5900-5999, corosync 5405-5412 and migration 60000-60050).
LINK_PORT_MIN, LINK_PORT_MAX = 20000, 29999
# A guest frame inside the tunnel costs the underlay an IP and a UDP header and the
# frame's own Ethernet header (no FCS): 20 + 8 + 14 for IPv4, 40 + 8 + 14 for IPv6.
LINK_OVERHEAD = {4: 42, 6: 62}
LINK_MTU_DEFAULT = {4: 1500 - 42, 6: 1500 - 62}  # what a 1500-byte underlay carries unfragmented
LINK_MTU_MAX = 65535 - 20 - 8 - 14  # the largest frame one UDP datagram holds


@dataclasses.dataclass(frozen=True)
class LinkEnd(NicEntry):
    """One end of a VM-to-VM link: NIC netN of this VM joined point to point (a wire, not a
    bridge) to NIC `peer` of a VM, by a UDP tunnel from `port` to the peer's `peer_port`."""

    mac: str
    port: int
    peer: tuple[int, int]  # (vmid, index) of the other end
    peer_port: int
    mtu: int = LINK_MTU_DEFAULT[4]

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mac", check_mac(self.mac))
        check_vmid(self.peer[0])
        check_nic_index(self.peer[1])
        for port in (self.port, self.peer_port):
            if not isinstance(port, int) or not LINK_PORT_MIN <= port <= LINK_PORT_MAX:
                raise SpecError(f"link port {port!r} of VM {self.vmid} {self.name} is outside "
                                f"{LINK_PORT_MIN}-{LINK_PORT_MAX}", "remove the link and add it again to get new ports")
        if self.peer == self.key:
            raise SpecError(f"VM {self.vmid} {self.name} cannot be linked to itself", "name two different NICs")
        if self.port == self.peer_port:
            raise SpecError(f"both ends of the link of VM {self.vmid} {self.name} have port {self.port}",
                            "remove the link and add it again to get new ports")
        if not isinstance(self.mtu, int) or not MTU_MIN <= self.mtu <= LINK_MTU_MAX:
            raise SpecError(f"link MTU {self.mtu!r} is outside {MTU_MIN}-{LINK_MTU_MAX}",
                            f"give --mtu between {MTU_MIN} and {LINK_MTU_MAX}")

    @property
    def end(self) -> str:
        """`100:net2`, as the link commands name an end."""
        return names.end_name(self.vmid, self.index)

    @property
    def peer_end(self) -> str:
        return names.end_name(*self.peer)

    @property
    def link_key(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The link's identity: its two ends, in order (the same from either end)."""
        return (min(self.key, self.peer), max(self.key, self.peer))

    def describe(self) -> str:
        return (f"link to VM {self.peer[0]} {names.nic_name(self.peer[1])}, UDP port {self.port} "
                f"(peer {self.peer_port}), MAC {self.mac}, MTU {self.mtu}")

    def mirrors(self, other: "LinkEnd") -> bool:
        """Is `other` this end's peer, as that VM's file must declare it?"""
        return (other.key == self.peer and other.peer == self.key and other.port == self.peer_port
                and other.peer_port == self.port and other.mtu == self.mtu)


_VOLUME = r"[A-Za-z][A-Za-z0-9._-]*:snippets/[A-Za-z0-9._+-]+"


@dataclasses.dataclass(frozen=True)
class ChainedHook:
    """The hookscript a VM had before `enable`: the agent's hookscript runs it after its own
    work in every phase, and `disable` puts it back (a VM has only one hookscript)."""

    vmid: int
    hookscript: str  # a Proxmox volume id, e.g. local:snippets/backup-hook.pl

    def __post_init__(self) -> None:
        check_vmid(self.vmid)
        if not isinstance(self.hookscript, str) or not re.fullmatch(_VOLUME, self.hookscript):
            raise SpecError(
                f"hookscript {self.hookscript!r} is not a snippet volume id",
                "write it as <storage>:snippets/<file>, e.g. local:snippets/hook.pl",
            )


@dataclasses.dataclass(frozen=True)
class VmSpec:
    """Everything declared for one VM."""

    vmid: int
    nics: tuple[VhostNic, ...] = ()
    tap_qinq: tuple[TapQinQ, ...] = ()
    chained_hook: ChainedHook | None = None
    links: tuple[LinkEnd, ...] = ()

    def __bool__(self) -> bool:
        """True when the agent has work for this VM (a chained hook alone is not work)."""
        return bool(self.nics or self.tap_qinq or self.links)

    @property
    def ovs_nics(self) -> tuple[VhostNic, ...]:
        """The vhost-user NICs whose port the agent makes in OVS-DPDK (backend ovs)."""
        return tuple(nic for nic in self.nics if nic.backend is Backend.OVS)


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """The whole cluster-wide spec file, in a stable order (vmid, then NIC index)."""

    nics: tuple[VhostNic, ...] = ()
    tap_qinq: tuple[TapQinQ, ...] = ()
    hooks: tuple[ChainedHook, ...] = ()
    links: tuple[LinkEnd, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nics", tuple(sorted(self.nics, key=lambda n: n.key)))
        object.__setattr__(self, "tap_qinq", tuple(sorted(self.tap_qinq, key=lambda q: q.key)))
        object.__setattr__(self, "hooks", tuple(sorted(self.hooks, key=lambda h: h.vmid)))
        object.__setattr__(self, "links", tuple(sorted(self.links, key=lambda e: e.key)))
        hook_vms = [h.vmid for h in self.hooks]
        if len(set(hook_vms)) != len(hook_vms):
            raise SpecError("a VM has two chained hookscripts", "keep one `vm:` section per VM")
        seen: dict[tuple[int, int], str] = {}
        for entry in (*self.nics, *self.tap_qinq, *self.links):
            if entry.key in seen:
                raise SpecError(
                    f"VM {entry.vmid} {entry.name} is declared twice",
                    "remove one of the entries from the spec file",
                )
            seen[entry.key] = entry.name
        macs: dict[str, VhostNic | LinkEnd] = {}
        for nic in (*self.nics, *self.links):
            other = macs.setdefault(nic.mac.lower(), nic)
            if other is not nic:
                raise SpecError(
                    f"MAC {nic.mac} of VM {nic.vmid} {nic.name} is already used by VM {other.vmid} {other.name}",
                    "give a different --mac, or leave it out to get a unique one",
                )
        ports: dict[int, LinkEnd] = {}
        for end in self.links:
            other = ports.setdefault(end.port, end)
            if other is not end:
                raise SpecError(f"link port {end.port} of VM {end.vmid} {end.name} is also the port of VM "
                                f"{other.vmid} {other.name}", "remove one of the links and add it again")

    @functools.cached_property
    def _by_vm(self) -> dict[int, VmSpec]:
        """Each VM's part, built once: a pass over hundreds of VMs asks for every one."""
        parts: dict[int, tuple[list, list, list]] = {}
        for nic in self.nics:
            parts.setdefault(nic.vmid, ([], [], []))[0].append(nic)
        for tap in self.tap_qinq:
            parts.setdefault(tap.vmid, ([], [], []))[1].append(tap)
        for end in self.links:
            parts.setdefault(end.vmid, ([], [], []))[2].append(end)
        hooks = {h.vmid: h for h in self.hooks}
        return {vmid: VmSpec(vmid, tuple(nics), tuple(taps), hooks.get(vmid), tuple(ends))
                for vmid, (nics, taps, ends) in parts.items()} | {
            vmid: VmSpec(vmid, (), (), hook) for vmid, hook in hooks.items() if vmid not in parts}

    def vmids(self) -> list[int]:
        return sorted({e.vmid for e in (*self.nics, *self.tap_qinq, *self.links)})

    def for_vm(self, vmid: int) -> VmSpec:
        found = self._by_vm.get(vmid)  # not `or`: a VM with only a chained hook is a falsy VmSpec
        return found if found is not None else VmSpec(vmid)

    def with_hook(self, vmid: int, hookscript: str | None) -> "ClusterSpec":
        """A copy where VM `vmid` chains `hookscript` (None: chains nothing)."""
        hooks = tuple(h for h in self.hooks if h.vmid != vmid)
        if hookscript is not None:
            hooks += (ChainedHook(vmid, hookscript),)
        return dataclasses.replace(self, hooks=hooks)

    def entry(self, vmid: int, index: int) -> VhostNic | TapQinQ | LinkEnd | None:
        for e in (*self.nics, *self.tap_qinq, *self.links):
            if e.key == (vmid, index):
                return e
        return None

    def with_entry(self, entry: VhostNic | TapQinQ | LinkEnd) -> "ClusterSpec":
        """A copy where `entry` replaces whatever the VM's NIC index had before."""
        rest = self.without(entry.vmid, entry.index)
        if isinstance(entry, VhostNic):
            return dataclasses.replace(rest, nics=rest.nics + (entry,))
        if isinstance(entry, LinkEnd):
            return dataclasses.replace(rest, links=rest.links + (entry,))
        return dataclasses.replace(rest, tap_qinq=rest.tap_qinq + (entry,))

    def without(self, vmid: int, index: int) -> "ClusterSpec":
        return dataclasses.replace(
            self,
            nics=tuple(n for n in self.nics if n.key != (vmid, index)),
            tap_qinq=tuple(q for q in self.tap_qinq if q.key != (vmid, index)),
            links=tuple(e for e in self.links if e.key != (vmid, index)),
        )

    def link_problems(self) -> tuple[str, ...]:
        """Link ends whose peer does not declare them back (say one VM's file was edited or
        lost): each is a dark link until fixed. One line each, with the fix."""
        ends = {end.key: end for end in self.links}
        problems = []
        for end in self.links:
            peer = ends.get(end.peer)
            if peer is None:
                problems.append(f"VM {end.vmid} {end.name} is linked to {end.peer_end}, which declares no link "
                                f"end; remove it: pve-vhost-agent link remove {end.end}")
            elif not end.mirrors(peer):
                problems.append(f"the link {end.end} - {end.peer_end} is declared differently by its two ends "
                                f"(peer, ports or MTU); remove it and add it again: pve-vhost-agent link remove {end.end}")
        return tuple(problems)


# --- validation helpers -------------------------------------------------------------


def is_decimal(text: str, max_digits: int = 10) -> bool:
    """Only ASCII digits, and not too many: `str.isdigit` accepts `²`, which int() refuses."""
    return text.isascii() and text.isdigit() and len(text) <= max_digits


def check_vmid(vmid: int) -> int:
    # Proxmox VM ids are 100..999999999; smaller ids exist only in tests of its own.
    if not isinstance(vmid, int) or isinstance(vmid, bool) or not 1 <= vmid <= 999_999_999:
        raise SpecError(f"VM id {vmid!r} is not a positive integer", "give the numeric VM id, e.g. 100")
    return vmid


def check_nic_index(index: int) -> int:
    if not isinstance(index, int) or not 0 <= index < MAX_NICS:
        raise SpecError(f"NIC index {index!r} is outside 0-{MAX_NICS - 1}", "name the NIC net0 .. net31")
    return index


def parse_nic_name(text: str) -> int:
    """`net3` -> 3."""
    index = names.nic_index(text.strip())
    if index is None:
        raise SpecError(f"{text!r} is not a NIC name", "name the NIC net0 .. net31, as in the VM config")
    return index


def check_vlan(vid: int, what: str = "VLAN") -> int:
    if not isinstance(vid, int) or isinstance(vid, bool) or not VLAN_MIN <= vid <= VLAN_MAX:
        raise SpecError(f"{what} {vid!r} is outside {VLAN_MIN}-{VLAN_MAX}", f"give a VLAN id between {VLAN_MIN} and {VLAN_MAX}")
    return vid


def parse_vlan_list(text: str, what: str = "VLAN list") -> tuple[int, ...]:
    """`10,20-22` (or Proxmox's `10;20-22`) -> (10, 20, 21, 22), sorted, no duplicates."""
    vids: set[int] = set()
    for part in re.split(r"[,;]", text.strip()):
        part = part.strip()
        if not part:
            raise SpecError(f"{what} {text!r} has an empty item", "write it like 10,20-30")
        bounds = part.split("-")
        if len(bounds) > 2 or not all(is_decimal(b) for b in bounds):
            raise SpecError(f"{what} {text!r} has a bad item {part!r}", "write it like 10,20-30")
        low, high = int(bounds[0]), int(bounds[-1])
        check_vlan(low, what)
        check_vlan(high, what)
        if low > high:
            raise SpecError(f"{what} range {part!r} runs backwards", f"write it as {high}-{low}")
        vids.update(range(low, high + 1))
    return tuple(sorted(vids))


def format_vlan_list(vids: Iterable[int]) -> str:
    """(10, 20, 21, 22) -> `10,20-22`: the compact form OVS and the spec file use."""
    out: list[str] = []
    ordered = sorted(set(vids))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


_SOCKET_PATH = r"/[A-Za-z0-9_./:+-]+"
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path holds 108 bytes with the final NUL


def check_socket_path(path: str) -> str:
    """An absolute unix socket path that QEMU's option syntax and Proxmox's split of `args:`
    read as written: no comma, `=`, quote, blank or `..` (refused, never escaped)."""
    if (not isinstance(path, str) or not re.fullmatch(_SOCKET_PATH, path) or "/../" in f"{path}/"
            or len(path.encode()) > MAX_SOCKET_PATH):
        raise SpecError(f"socket path {str(path)[:120]!r} is not an absolute path of at most {MAX_SOCKET_PATH} bytes "
                        "from A-Z a-z 0-9 _ . / : + -", "give the path the vhost-user server listens on, e.g. "
                        "/run/vpp/vm-100-0.sock")
    return path


def check_ifname(name: str, what: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(_IFNAME, name):
        raise SpecError(
            f"{what} name {name!r} is not a valid interface name",
            "use 1-15 characters from A-Z a-z 0-9 _ . - (no comma, =, quote or space)",
        )
    return name


def check_mac(mac: str) -> str:
    """A unicast, non-zero MAC in upper-case colon form (the form Proxmox writes)."""
    if not isinstance(mac, str) or not re.fullmatch(_MAC, mac):
        raise SpecError(f"MAC {mac!r} is malformed", "write it as six hex pairs, e.g. 02:00:00:12:34:56")
    octets = bytes(int(x, 16) for x in mac.split(":"))
    if octets == bytes(6):
        raise SpecError(f"MAC {mac} is all zeros", "give a unicast MAC, or leave --mac out to get one")
    if octets[0] & 0x01:
        raise SpecError(f"MAC {mac} is a multicast address", "give a unicast MAC (first octet even), or leave --mac out")
    return mac.upper()


_MAC_PREFIX = r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){0,4}"


def check_mac_prefix(prefix: str) -> str:
    """A `mac_prefix` as /etc/pve/datacenter.cfg gives it: one to five octets, unicast."""
    if not re.fullmatch(_MAC_PREFIX, prefix) or int(prefix[:2], 16) & 0x01:
        raise SpecError(f"mac_prefix {prefix[:40]!r} in datacenter.cfg is not a unicast MAC prefix",
                        "fix it in Datacenter > Options > MAC address prefix, e.g. BC:24:11")
    return prefix.upper()


def random_mac(random6: bytes, prefix: str | None = None) -> str:
    """A MAC as Proxmox makes one (PVE::Tools::random_ether_addr): random, unicast and
    locally administered, its leading octets replaced by the cluster's `mac_prefix`."""
    octets = bytes([(random6[0] & 0xFE) | 0x02]) + bytes(random6[1:6])
    mac = ":".join(f"{b:02X}" for b in octets)
    return check_mac((check_mac_prefix(prefix) + mac[len(prefix):]) if prefix else mac)


def unused_mac(candidates: Iterable[str], taken: Iterable[str], tries: int = 64) -> str:
    """The first candidate no NIC of the cluster or the VM has (random: almost always the first)."""
    used = {m.upper() for m in taken}
    for _attempt, mac in zip(range(tries), candidates):
        if mac.upper() not in used:
            return mac
    raise SpecError(f"no unused MAC in {tries} random tries", "give one with --mac")