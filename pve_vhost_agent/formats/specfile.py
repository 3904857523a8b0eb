"""The cluster-wide spec file in Proxmox's section-config style (like /etc/pve/sdn/*.cfg).

Pure: text in, ClusterSpec out, and back. One section per NIC:

    vhostuser: 100-net1
    \tbridge br-dpdk
    \tmac 02:9A:3C:11:20:07
    \ttag 10

    qinq: 101-net0
    \tqinq 200
    \tcvlans 10,20-30

    link: 100-net2
    \tpeer 101:net3
    \tport 20000
    \tpeer-port 20001
    \tmac 02:9A:3C:11:20:09
    \tmtu 1458

    vm: 100
    \tchain-hookscript local:snippets/backup-hook.pl

The id names the VM and the NIC, so no key repeats them. A `link` section is one end of a
VM-to-VM link; its peer's file holds the other end (both are written together). A `vm` section records the
hookscript a VM had before `pve-vhost-agent enable` (the agent's hookscript chains it). Defaults are left out when
writing (bridge and mac are always written), and the output is sorted by VM and NIC,
so the same spec always gives the same bytes.
"""

from __future__ import annotations

import re

from pve_vhost_agent.model import fields, names, spec
from pve_vhost_agent.errors import SpecError

VHOST = "vhostuser"
QINQ = "qinq"
LINK = "link"
VM = "vm"
_HEADER = re.compile(r"^(\S+):\s*(\S+)\s*$")
_PROPERTY = re.compile(r"^\s+(\S+)(?:\s+(.*\S))?\s*$")
_VM_ID = re.compile(r"^[0-9]{1,10}$")
# The shape of a NIC section id; names.SECTION decides which ids are valid (say net0-31).
# Digits are bounded: a 5,000-digit id is refused as a bad id, not handed to int().
_SECTION_SHAPE = re.compile(r"^([0-9]{1,10})-(net[0-9]{1,10})$")
_FIELDS = {VHOST: fields.vhost_fields(), QINQ: fields.QINQ_FIELDS, LINK: fields.LINK_FIELDS}
KEYS = {**{kind: tuple(f.key for f in found) for kind, found in _FIELDS.items()}, VM: ("chain-hookscript",)}


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
            tuple(e for e in entries if isinstance(e, spec.LinkEnd)),
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
        if isinstance(entry, (spec.VhostNic, spec.LinkEnd)):
            other = macs.setdefault(entry.mac, section)
            if other is not section:
                raise SpecError(f"{source} line {section.lineno}: MAC {entry.mac} of {section.ident} is already used by "
                                f"{other.ident} (line {other.lineno})", "give one of them another MAC")


def _start_section(line: str, lineno: int, where: str) -> _Section:
    match = _HEADER.match(line)
    if not match:
        raise SpecError(f"{where}: {line.strip()!r} is not a section header",
                        "start a section with `vhostuser: <vmid>-net<N>`, `qinq: <vmid>-net<N>` or `link: <vmid>-net<N>`")
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
        if "chain-hookscript" not in section.props:
            raise SpecError("the section has no `chain-hookscript` line", "add a line `<tab>chain-hookscript <value>`")
        return spec.ChainedHook(int(section.ident), section.props["chain-hookscript"][1])
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


def _entry(section: _Section, source: str) -> spec.VhostNic | spec.TapQinQ | spec.LinkEnd:
    """Build one entry; a bad value names its own line, a bad combination the header's."""
    def at(key: str, err: SpecError) -> SpecError:
        return SpecError(f"{source} line {section.props[key][0]}: {err.problem}", err.fix)

    by_key = {f.key: f for f in _FIELDS[section.kind]}
    values = {}
    for key, (_lineno, text) in section.props.items():
        try:
            values[by_key[key].name] = by_key[key].read(text)
        except SpecError as err:
            raise at(key, err) from err
    if "qinq" not in values:
        for key in ("cvlans", "ethertype"):
            if key in values:
                raise at(key, SpecError(f"`{key}` is set without `qinq`", "add a `qinq <S-tag>` line or remove this one"))
    try:
        qinq = fields.qinq_of(values)
    except SpecError as err:
        raise at("qinq", err) from err
    try:
        vmid_text, nic = _SECTION_SHAPE.match(section.ident).groups()
        vmid, index = spec.check_vmid(int(vmid_text)), spec.parse_nic_name(nic)
        if section.kind == LINK:
            for required in (f.key for f in fields.LINK_FIELDS):
                if required not in section.props:
                    raise SpecError(f"the section has no `{required}` line", f"add a line `<tab>{required} <value>`")
            return spec.LinkEnd(vmid=vmid, index=index, **values)
        if section.kind == QINQ:
            if qinq is None:
                raise SpecError("the section has no `qinq <S-tag>` line", "add a line `<tab>qinq <1-4094>`")
            return spec.TapQinQ(vmid, index, qinq)
        for required in (f.key for f in fields.NIC_FIELDS if f.always):
            if required not in values:
                raise SpecError(f"the section has no `{required}` line", f"add a line `<tab>{required} <value>`")
        scalars = {f.name: values[f.name] for f in fields.NIC_FIELDS if f.name in values}
        return spec.VhostNic(vmid=vmid, index=index, vlan=fields.vlan_policy(values) or spec.VlanPolicy(), **scalars)
    except SpecError as err:
        raise SpecError(f"{source} line {section.lineno} ({section.kind}: {section.ident}): {err.problem}",
                        err.fix) from err


# --- writing ------------------------------------------------------------------------


def format_entry(entry: spec.VhostNic | spec.TapQinQ | spec.LinkEnd) -> str:
    """One section, with its blank line at the end."""
    if isinstance(entry, spec.TapQinQ):
        kind, props = QINQ, fields.vlan_written(spec.VlanPolicy(qinq=entry.qinq))
    elif isinstance(entry, spec.LinkEnd):
        kind, props = LINK, fields.link_written(entry)
    else:
        kind, props = VHOST, fields.written(entry)
    body = "".join(f"\t{key} {value}\n" for key, value in props)
    return f"{kind}: {names.SECTION(entry.vmid, entry.index)}\n{body}\n"


def format_spec(cluster: spec.ClusterSpec) -> str:
    entries = sorted((*cluster.nics, *cluster.tap_qinq, *cluster.links), key=lambda e: e.key)
    hooks = "".join(f"{VM}: {h.vmid}\n\tchain-hookscript {h.hookscript}\n\n" for h in cluster.hooks)
    return "".join(format_entry(e) for e in entries) + hooks
