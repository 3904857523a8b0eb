"""The cluster-wide spec file in Proxmox's section-config style (like /etc/pve/sdn/*.cfg).

Pure: text in, ClusterSpec out, and back. One section per NIC:

    vhostuser: 100-net1
    \tbridge br-dpdk
    \tmac 02:9A:3C:11:20:07
    \ttag 10

    qinq: 101-net0
    \tqinq 200
    \tcvlans 10,20-30

    vm: 100
    \tchain-hookscript local:snippets/backup-hook.pl

The id names the VM and the NIC, so no key repeats them. A `vm` section records the
hookscript a VM had before `pve-vhost-agent enable` (the agent's hookscript chains it). Defaults are left out when
writing (bridge and mac are always written), and the output is sorted by VM and NIC,
so the same spec always gives the same bytes.
"""

from __future__ import annotations

import enum
import re

from pve_vhost_agent.model import names, spec
from pve_vhost_agent.errors import SpecError

VHOST = "vhostuser"
QINQ = "qinq"
VM = "vm"
_HEADER = re.compile(r"^(\S+):\s*(\S+)\s*$")
_PROPERTY = re.compile(r"^\s+(\S+)(?:\s+(.*\S))?\s*$")
_VM_ID = re.compile(r"^[0-9]+$")
# The shape of a NIC section id; names.SECTION decides which ids are valid (say net0-31).
_SECTION_SHAPE = re.compile(r"^([0-9]+)-(net[0-9]+)$")
_VHOST_KEYS = ("backend", "bridge", "mac", "tag", "trunks", "qinq", "cvlans", "ethertype",
               "queues", "rx-queue-size", "tx-queue-size", "mtu")
_QINQ_KEYS = ("qinq", "cvlans", "ethertype")
KEYS = {VHOST: _VHOST_KEYS, QINQ: _QINQ_KEYS, VM: ("chain-hookscript",)}


class _Section:
    """One section being read: its header line number, type, id and properties."""

    def __init__(self, lineno: int, kind: str, ident: str):
        self.lineno, self.kind, self.ident = lineno, kind, ident
        self.props: dict[str, tuple[int, str]] = {}


def parse_spec(text: str, source: str = "spec file") -> spec.ClusterSpec:
    """Read the whole file; any error names `source`, the line and the fix."""
    sections: list[_Section] = []
    current: _Section | None = None
    for lineno, line in enumerate(text.split("\n"), start=1):
        where = f"{source} line {lineno}"
        if not line.strip():
            current = None
            continue
        if line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            current = _add_property(current, line, lineno, where)
            continue
        current = _start_section(line, lineno, where)
        sections.append(current)
    nic_sections = [s for s in sections if s.kind != VM]
    entries = [_entry(section, source) for section in nic_sections]
    _check_unique(nic_sections, entries, source)
    hooks = [_hook(section, source) for section in sections if section.kind == VM]
    try:
        return spec.ClusterSpec(
            tuple(e for e in entries if isinstance(e, spec.VhostNic)),
            tuple(e for e in entries if isinstance(e, spec.TapQinQ)),
            tuple(hooks),
        )
    except SpecError as err:
        raise SpecError(f"{source}: {err.problem}", err.fix) from err


def _check_unique(sections: list[_Section], entries: list, source: str) -> None:
    """Repeated NICs or MACs, named by the line of the second section."""
    ids: dict[tuple[int, int], int] = {}
    macs: dict[str, _Section] = {}
    for section, entry in zip(sections, entries):
        first = ids.setdefault(entry.key, section.lineno)
        if first != section.lineno:
            raise SpecError(f"{source} line {section.lineno}: {section.ident} is declared again (first on line {first})",
                            "remove one of the two sections")
        if isinstance(entry, spec.VhostNic):
            other = macs.setdefault(entry.mac, section)
            if other is not section:
                raise SpecError(f"{source} line {section.lineno}: MAC {entry.mac} of {section.ident} is already used by "
                                f"{other.ident} (line {other.lineno})", "give one of them another MAC")


def _start_section(line: str, lineno: int, where: str) -> _Section:
    match = _HEADER.match(line)
    if not match:
        raise SpecError(f"{where}: {line.strip()!r} is not a section header",
                        "start a section with `vhostuser: <vmid>-net<N>` or `qinq: <vmid>-net<N>`")
    kind, ident = match.groups()
    if kind not in KEYS:
        raise SpecError(f"{where}: unknown section type {kind!r}", f"use one of: {', '.join(KEYS)}")
    if kind == VM:
        if not _VM_ID.match(ident):
            raise SpecError(f"{where}: section id {ident!r} is not a VM id", "name it like `vm: 100`")
    elif not _SECTION_SHAPE.match(ident):
        raise SpecError(f"{where}: section id {ident!r} is not <vmid>-net<N>", "name it like 100-net1")
    return _Section(lineno, kind, ident)


def _hook(section: _Section, source: str) -> spec.ChainedHook:
    try:
        return spec.ChainedHook(int(section.ident), _Reader(section, source).text("chain-hookscript"))
    except SpecError as err:
        raise SpecError(f"{source} line {section.lineno} ({section.kind}: {section.ident}): {err.problem}",
                        err.fix) from err


def _add_property(current: _Section | None, line: str, lineno: int, where: str) -> _Section:
    if current is None:
        raise SpecError(f"{where}: indented line outside a section",
                        "put properties right under their section header, with no blank line between")
    key, value = _PROPERTY.match(line).groups()  # the line is indented and not blank
    if key not in KEYS[current.kind]:
        raise SpecError(f"{where}: unknown key {key!r} in a {current.kind} section",
                        f"use only: {', '.join(KEYS[current.kind])}")
    if value is None:
        raise SpecError(f"{where}: key {key!r} has no value", f"write it as `<tab>{key} <value>`")
    if key in current.props:
        raise SpecError(f"{where}: key {key!r} is repeated", "keep one line per key")
    current.props[key] = (lineno, value)
    return current


def _entry(section: _Section, source: str) -> spec.VhostNic | spec.TapQinQ:
    """Build one entry; a bad value names its own line, a bad combination the header's."""
    read = _Reader(section, source)
    try:
        vmid_text, nic = _SECTION_SHAPE.match(section.ident).groups()
        vmid, index = spec.check_vmid(int(vmid_text)), spec.parse_nic_name(nic)
        qinq = read.qinq()
        if section.kind == QINQ:
            if qinq is None:
                raise SpecError("the section has no `qinq <S-tag>` line", "add a line `<tab>qinq <1-4094>`")
            return spec.TapQinQ(vmid, index, qinq)
        return spec.VhostNic(
            vmid=vmid,
            index=index,
            bridge=read.text("bridge"),
            mac=read.text("mac"),
            backend=read.choice("backend", spec.Backend, spec.Backend.OVS),
            vlan=spec.VlanPolicy(tag=read.number("tag", None), trunks=read.vlans("trunks"), qinq=qinq),
            queues=read.number("queues", 1),
            rx_queue_size=read.number("rx-queue-size", spec.DEFAULT_QUEUE_SIZE),
            tx_queue_size=read.number("tx-queue-size", spec.DEFAULT_QUEUE_SIZE),
            mtu=read.number("mtu", None),
        )
    except SpecError as err:
        if err.problem.startswith(f"{source} line "):
            raise
        raise SpecError(f"{source} line {section.lineno} ({section.kind}: {section.ident}): {err.problem}",
                        err.fix) from err


class _Reader:
    """Typed access to a section's properties; errors name the property's line."""

    def __init__(self, section: _Section, source: str):
        self.section, self.source = section, source

    def _at(self, key: str, problem: str, fix: str) -> SpecError:
        lineno = self.section.props[key][0]
        return SpecError(f"{self.source} line {lineno}: {problem}", fix)

    def text(self, key: str) -> str:
        if key not in self.section.props:
            raise SpecError(f"the section has no `{key}` line", f"add a line `<tab>{key} <value>`")
        return self.section.props[key][1]

    def number(self, key: str, default: int | None) -> int | None:
        if key not in self.section.props:
            return default
        value = self.section.props[key][1]
        if not value.isdigit():
            raise self._at(key, f"{key} {value!r} is not a number", f"write {key} as a decimal number")
        return int(value)

    def vlans(self, key: str) -> tuple[int, ...]:
        if key not in self.section.props:
            return ()
        try:
            return spec.parse_vlan_list(self.section.props[key][1], key)
        except SpecError as err:
            raise self._at(key, err.problem, err.fix) from err

    def choice(self, key: str, enum_type: type[enum.Enum], default: enum.Enum) -> enum.Enum:
        if key not in self.section.props:
            return default
        value = self.section.props[key][1]
        try:
            return enum_type(value)
        except ValueError as err:
            choices = ", ".join(m.value for m in enum_type)
            raise self._at(key, f"{key} {value!r} is not known", f"use one of: {choices}") from err

    def qinq(self) -> spec.QinQ | None:
        if "qinq" not in self.section.props:
            for key in ("cvlans", "ethertype"):
                if key in self.section.props:
                    raise self._at(key, f"`{key}` is set without `qinq`", "add a `qinq <S-tag>` line or remove this one")
            return None
        try:
            stag = self.number("qinq", None)
            return spec.QinQ(stag, self.vlans("cvlans"),
                             self.choice("ethertype", spec.EtherType, spec.EtherType.DOT1AD))
        except SpecError as err:
            if err.problem.startswith(f"{self.source} line "):
                raise
            raise self._at("qinq", err.problem, err.fix) from err


# --- writing ------------------------------------------------------------------------


def format_entry(entry: spec.VhostNic | spec.TapQinQ) -> str:
    """One section, with its blank line at the end."""
    if isinstance(entry, spec.TapQinQ):
        props = _qinq_props(entry.qinq)
        kind = QINQ
    else:
        props = _vhost_props(entry)
        kind = VHOST
    body = "".join(f"\t{key} {value}\n" for key, value in props)
    return f"{kind}: {names.SECTION(entry.vmid, entry.index)}\n{body}\n"


def format_spec(cluster: spec.ClusterSpec) -> str:
    entries = sorted((*cluster.nics, *cluster.tap_qinq), key=lambda e: e.key)
    hooks = "".join(f"{VM}: {h.vmid}\n\tchain-hookscript {h.hookscript}\n\n" for h in cluster.hooks)
    return "".join(format_entry(e) for e in entries) + hooks


def _vhost_props(nic: spec.VhostNic) -> list[tuple[str, str]]:
    props = [("bridge", nic.bridge), ("mac", nic.mac)]
    if nic.backend != spec.Backend.OVS:
        props.append(("backend", nic.backend.value))
    if nic.vlan.tag is not None:
        props.append(("tag", str(nic.vlan.tag)))
    if nic.vlan.trunks:
        props.append(("trunks", spec.format_vlan_list(nic.vlan.trunks)))
    if nic.vlan.qinq:
        props.extend(_qinq_props(nic.vlan.qinq))
    if nic.queues != 1:
        props.append(("queues", str(nic.queues)))
    if nic.rx_queue_size != spec.DEFAULT_QUEUE_SIZE:
        props.append(("rx-queue-size", str(nic.rx_queue_size)))
    if nic.tx_queue_size != spec.DEFAULT_QUEUE_SIZE:
        props.append(("tx-queue-size", str(nic.tx_queue_size)))
    if nic.mtu is not None:
        props.append(("mtu", str(nic.mtu)))
    return props


def _qinq_props(qinq: spec.QinQ) -> list[tuple[str, str]]:
    props = [("qinq", str(qinq.stag))]
    if qinq.cvlans:
        props.append(("cvlans", spec.format_vlan_list(qinq.cvlans)))
    if qinq.ethertype != spec.EtherType.DOT1AD:
        props.append(("ethertype", qinq.ethertype.value))
    return props
