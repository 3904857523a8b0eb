"""/etc/network/interfaces as ifupdown2 reads it (Proxmox's network configuration). Pure.

`parse_file` reads one file's text: its `auto`/`allow-auto` lines, `iface` stanzas and
`source`/`source-directory` lines (which the adapter resolves, with their globs, and
parses in turn, depth first, as ifupdown2 does). `combine` merges the files into one
`NetworkFile`, with the stanzas of one name (inet and inet6) merged, the way ifupdown2
builds one interface object from them.

What ifupdown2 does and this reader follows: comments are whole lines starting with
`#`; a trailing backslash continues a line; option names take `_` as `-`
(`bridge_ports` is `bridge-ports`); `bond-ports` is `bond-slaves`; `none` is an empty
port list; a dotted name (`bond0.100`) is a VLAN device on the part before the last dot,
and `vlanN` with `vlan-raw-device` is VLAN N. `source-directory` reads the folder's files
whose names are only letters, digits, `_` and `-` (sorted here; ifupdown2 takes the
folder's order).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from pve_vhost_agent.model.hostnet import DOT1AD, DOT1Q, IfaceStanza, NetworkFile, bond_mode_name, XMIT_HASH_POLICIES

_STANZA_KEYWORDS = ("iface", "auto", "source", "source-directory", "mapping", "vlan", "rename", "template")
SOURCE_DIRECTORY_FILE = re.compile(r"[A-Za-z0-9_-]+")
_TRUE, _FALSE = ("yes", "on", "1", "true"), ("no", "off", "0", "false")


@dataclasses.dataclass(frozen=True)
class Source:
    """A `source` or `source-directory` line: a glob the adapter resolves and reads."""

    kind: str  # "source" or "source-directory"
    pattern: str
    where: str


@dataclasses.dataclass(frozen=True)
class RawIface:
    name: str
    where: str
    method: str
    options: tuple[tuple[str, str, str], ...]  # (name with `-`, value, "file:line")


@dataclasses.dataclass(frozen=True)
class ParsedFile:
    path: str
    auto: tuple[str, ...] = ()
    ifaces: tuple[RawIface, ...] = ()
    sources: tuple[Source, ...] = ()
    problems: tuple[str, ...] = ()


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with backslash continuations joined."""
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append((start, pending + raw))
        pending = ""
    if pending:
        lines.append((start, pending))
    return lines


def _is_keyword(word: str) -> bool:
    return word in _STANZA_KEYWORDS or word.startswith("allow-")


def parse_file(text: str, path: str) -> ParsedFile:
    auto: list[str] = []
    ifaces: list[RawIface] = []
    sources: list[Source] = []
    problems: list[str] = []
    current: tuple[str, str, str, list] | None = None  # name, where, method, options

    def close() -> None:
        nonlocal current
        if current is not None:
            ifaces.append(RawIface(current[0], current[1], current[2], tuple(current[3])))
            current = None

    for number, line in _logical_lines(text):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        keyword = words[0]
        if _is_keyword(keyword):
            close()
            if keyword == "iface":
                if len(words) < 2:
                    problems.append(f"{where}: `iface` without an interface name")
                    continue
                current = (words[1].split(":", 1)[0], where, words[3] if len(words) > 3 else "", [])
            elif keyword in ("auto", "allow-auto"):
                auto.extend(words[1:])
            elif keyword in ("source", "source-directory"):
                if len(words) < 2:
                    problems.append(f"{where}: `{keyword}` without a path")
                else:
                    sources.append(Source(keyword, words[1], where))
            continue  # mapping, allow-hotplug, ...: nothing the doctor checks
        if current is None:
            problems.append(f"{where}: `{keyword}` is outside any iface stanza")
            continue
        if len(words) < 2:
            problems.append(f"{where}: iface {current[0]}: `{keyword}` has no value")
            continue
        current[3].append((keyword.replace("_", "-"), line.split(None, 1)[1].strip(), where))
    close()
    return ParsedFile(path, tuple(auto), tuple(ifaces), tuple(sources), tuple(problems))


def combine(files: Iterable[ParsedFile], extra_problems: Iterable[str] = ()) -> NetworkFile:
    """The files (in ifupdown2's reading order) as one NetworkFile."""
    files = list(files)
    auto = {name for f in files for name in f.auto}
    merged: dict[str, list[RawIface]] = {}
    for f in files:
        for raw in f.ifaces:
            merged.setdefault(raw.name, []).append(raw)
    problems = [p for f in files for p in f.problems] + list(extra_problems)
    stanzas = []
    for name, raws in merged.items():
        stanza, wrong = _stanza(name, name in auto, raws)
        stanzas.append(stanza)
        problems += wrong
    return NetworkFile(tuple(stanzas), tuple(f.path for f in files), tuple(problems))


def _stanza(name: str, auto: bool, raws: list[RawIface]) -> tuple[IfaceStanza, list[str]]:
    values: dict = {}
    post_up: list[str] = []
    problems: list[str] = []
    for key, value, where in (option for raw in raws for option in raw.options):
        if key in ("post-up", "up"):
            post_up.append(value)
            continue
        reader = _READERS.get(key)
        if reader is None:
            continue
        field, read = reader
        try:
            values[field] = read(value)
        except ValueError as err:
            problems.append(f"{where}: iface {name}: {key} {value!r}: {err}")
    values.setdefault("ovs_type", "")
    _vlan_from_name(name, values)
    stanza = IfaceStanza(name=name, where=raws[0].where, auto=auto, method=next((r.method for r in raws if r.method), ""),
                         post_up=tuple(post_up), **values)
    return stanza, problems


def _vlan_from_name(name: str, values: dict) -> None:
    """ifupdown2's VLAN naming: `raw.N`, or `vlanN` (with vlan-raw-device)."""
    if values.get("ovs_type"):
        return
    base, dot, suffix = name.rpartition(".")
    if dot and suffix.isdigit():
        values.setdefault("vlan_raw_device", base)
        values.setdefault("vlan_id", int(suffix))
    elif values.get("vlan_raw_device") and name.startswith("vlan") and name[4:].isdigit():
        values.setdefault("vlan_id", int(name[4:]))


def _int(value: str) -> int:
    if not value.isdigit():
        raise ValueError("not a whole number")
    return int(value)


def _mtu(value: str) -> int:
    mtu = _int(value)
    if not 68 <= mtu <= 65535:
        raise ValueError("outside 68-65535")
    return mtu


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError("not a number of seconds") from None


def _bool(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError("not yes or no")


def _names(value: str) -> tuple[str, ...]:
    names = tuple(value.split())
    return () if names == ("none",) else names


def _bond_mode(value: str) -> str:
    mode = bond_mode_name(value)
    if mode is None:
        raise ValueError("not a bonding mode")
    return mode


def _hash_policy(value: str) -> str:
    if value not in XMIT_HASH_POLICIES:
        raise ValueError("not a transmit hash policy")
    return value


def parse_vids(value: str) -> tuple[int, ...]:
    """`2-4094`, `10 20 30-40`, `10,20`: the VLAN ids, sorted."""
    vids: set[int] = set()
    for item in re.split(r"[\s,]+", value.strip()):
        low, dash, high = item.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"{item!r} is not a VLAN id or range")
        first, last = int(low), int(high) if dash else int(low)
        if not 1 <= first <= last <= 4094:
            raise ValueError(f"{item!r} is outside 1-4094")
        vids.update(range(first, last + 1))
    return tuple(sorted(vids))


def _vlan_protocol(value: str) -> str:
    protocol = value.lower()
    if protocol not in (DOT1Q, DOT1AD):
        raise ValueError("not 802.1q or 802.1ad")
    return protocol


def _vid(value: str) -> int:
    vid = _int(value)
    if not 0 <= vid <= 4094:
        raise ValueError("outside 0-4094")
    return vid


# option -> (IfaceStanza field, reader)
_READERS = {
    "mtu": ("mtu", _mtu),
    "bond-slaves": ("bond_slaves", _names),
    "bond-ports": ("bond_slaves", _names),
    "bond-mode": ("bond_mode", _bond_mode),
    "bond-miimon": ("bond_miimon", _int),
    "bond-xmit-hash-policy": ("bond_xmit_hash_policy", _hash_policy),
    "bridge-ports": ("bridge_ports", _names),
    "bridge-vlan-aware": ("bridge_vlan_aware", _bool),
    "bridge-vids": ("bridge_vids", parse_vids),
    "bridge-stp": ("bridge_stp", _bool),
    "bridge-fd": ("bridge_fd", _seconds),
    "vlan-raw-device": ("vlan_raw_device", str),
    "vlan-id": ("vlan_id", _vid),
    "vlan-protocol": ("vlan_protocol", _vlan_protocol),
    "ovs-type": ("ovs_type", str),
}
