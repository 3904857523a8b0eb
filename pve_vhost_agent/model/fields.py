"""The fields of a vhost-user NIC, declared once.

Each field has its name (the `VhostNic` attribute), its key (the spec file's key and the
command line's `--option`), how its text is read and written, its default (not written to
the spec file) and its help. The spec file reader and writer, the `nic add|set` options
and the change record (`NicChange`) are all derived from this table, so a new NIC field
is one entry here (and what it means in the planners).

A link end (`link` section) has its own table, LINK_FIELDS: the spec file reader and
writer use it; `link add` chooses every value itself (ports, MACs) except the MTU and MACs.

The VLAN mode is five keys that make one value (`tag`, `trunks`, or `qinq` with its
`cvlans` and `ethertype`): they are listed in VLAN_FIELDS and read together by
`vlan_policy`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from pve_vhost_agent.errors import SpecError
from pve_vhost_agent.model import names, spec

MAX_DIGITS = 10  # no field needs more; a 5,000-digit number is refused before int() sees it


def number(text: str, what: str) -> int:
    """A number written in ASCII digits (at most MAX_DIGITS); ranges are the model's to
    check (spec.py)."""
    text = text.strip()
    if not spec.is_decimal(text, MAX_DIGITS):
        raise SpecError(f"{what} {text[:20]!r} is not a number", f"write {what} as a decimal number")
    return int(text)


@dataclasses.dataclass(frozen=True)
class NicField:
    """One NIC field: its name, spec file key and option, how it is read, its default."""

    name: str  # VhostNic attribute and NicChange key
    key: str  # spec file key and --option
    read: Callable[[str], Any]  # text (command line or spec file) -> value; SpecError when bad
    default: Any  # not written to the spec file; None with `always` for required fields
    help: str
    metavar: str = "TEXT"
    choices: tuple[str, ...] = ()
    always: bool = False  # written even when it equals the default (bridge, mac)
    text: Callable[[Any], str] | None = None  # how a value is written, when str() is not it

    def write(self, value: Any) -> str:
        if self.text is not None:
            return self.text(value)
        return value.value if hasattr(value, "value") else str(value)


def _choice(key: str, kind: type) -> Callable[[str], Any]:
    def read(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise SpecError(f"{key} {text[:40]!r} is not known", f"use one of: {', '.join(m.value for m in kind)}") from None
    return read


NIC_FIELDS: tuple[NicField, ...] = (
    NicField("bridge", "bridge", lambda text: spec.check_ifname(text, "bridge"), None,
             "OVS bridge (datapath_type=netdev) the port goes on.", "BRIDGE", always=True),
    NicField("mac", "mac", spec.check_mac, None,
             "MAC address (default: a random, unique, locally administered one).", "MAC", always=True),
    NicField("backend", "backend", _choice("backend", spec.Backend), spec.Backend.OVS,
             "ovs: an OVS-DPDK port (default); external: a vhost-user server such as VPP/TNSR.",
             choices=tuple(b.value for b in spec.Backend)),
    NicField("socket", "socket", spec.check_socket_path, None,
             "With --backend external: the socket the vhost-user server (VPP/TNSR) listens on "
             "(default: /run/pve-vhost-agent/external/vm-<vmid>-<N>.sock).", "PATH"),
    NicField("queues", "queues", lambda text: number(text, "queues"), 1,
             f"Queue pairs (multiqueue), 1-{spec.QUEUES_MAX}.", "N"),
    NicField("rx_queue_size", "rx-queue-size", lambda text: number(text, "rx-queue-size"), spec.DEFAULT_QUEUE_SIZE,
             "256, 512 or 1024 (default).", "SIZE"),
    NicField("tx_queue_size", "tx-queue-size", lambda text: number(text, "tx-queue-size"), spec.DEFAULT_QUEUE_SIZE,
             "256, 512 or 1024 (default).", "SIZE"),
    NicField("mtu", "mtu", lambda text: number(text, "mtu"), None,
             f"MTU of the port ({spec.MTU_MIN}-{spec.MTU_MAX}).", "MTU"),
)
# The spec file writes the VLAN mode's keys after this field.
_VLAN_AFTER = "socket"

VLAN_FIELDS: tuple[NicField, ...] = (
    NicField("tag", "tag", lambda text: number(text, "tag"), None, "Access VLAN (1-4094).", "VLAN"),
    NicField("trunks", "trunks", lambda text: spec.parse_vlan_list(text, "trunk VLAN list"), (),
             "Allowed VLANs, e.g. 10,20-30.", "LIST"),
    NicField("qinq", "qinq", lambda text: number(text, "qinq"), None,
             "QinQ (dot1q-tunnel) with this service VLAN (S-tag).", "STAG"),
    NicField("cvlans", "cvlans", lambda text: spec.parse_vlan_list(text, "customer VLAN list"), (),
             "With --qinq: allowed customer VLANs (default: all).", "LIST"),
    NicField("ethertype", "ethertype", _choice("ethertype", spec.EtherType), spec.EtherType.DOT1AD,
             "With --qinq: outer tag type (default 802.1ad).", choices=tuple(e.value for e in spec.EtherType)),
)
QINQ_FIELDS = VLAN_FIELDS[2:]  # what a tap NIC's QinQ entry has


def _link_end(text: str) -> tuple[int, int]:
    end = names.parse_end_name(text)
    if end is None:
        raise SpecError(f"link end {text[:40]!r} is not <vmid>:net<N>", "write it like 101:net3")
    return end


# A link end's keys, all written always: every value is chosen once and must never change.
LINK_FIELDS: tuple[NicField, ...] = (
    NicField("peer", "peer", _link_end, None, "The other end of the link, <vmid>:net<N>.", "END",
             always=True, text=lambda end: names.end_name(*end)),
    NicField("port", "port", lambda text: number(text, "port"), None, "This end's UDP port.", "PORT", always=True),
    NicField("peer_port", "peer-port", lambda text: number(text, "peer-port"), None, "The other end's UDP port.",
             "PORT", always=True),
    NicField("mac", "mac", spec.check_mac, None, "MAC address of this end's NIC.", "MAC", always=True),
    NicField("mtu", "mtu", lambda text: number(text, "mtu"), None, "Guest MTU (host_mtu) of both ends.", "MTU",
             always=True),
)


def link_written(end: spec.LinkEnd) -> list[tuple[str, str]]:
    """(key, text) of a link end as the spec file holds it."""
    return [(field.key, field.write(getattr(end, field.name))) for field in LINK_FIELDS]


def vhost_fields() -> tuple[NicField, ...]:
    """Every field of a vhost-user NIC, in the order the spec file writes them."""
    cut = next(i for i, f in enumerate(NIC_FIELDS) if f.name == _VLAN_AFTER) + 1
    return NIC_FIELDS[:cut] + VLAN_FIELDS + NIC_FIELDS[cut:]


def read_fields(values: Mapping[str, str], fields: tuple[NicField, ...]) -> dict[str, Any]:
    """{name: value} for the keys of `values` (text) that `fields` declares."""
    by_key = {f.key: f for f in fields}
    return {by_key[key].name: by_key[key].read(text) for key, text in values.items() if key in by_key}


def vlan_policy(values: Mapping[str, Any]) -> spec.VlanPolicy | None:
    """The VLAN mode that read VLAN_FIELDS values ask for (None: they name none)."""
    given = [f"--{f.key}" for f in VLAN_FIELDS[:3] if values.get(f.name) not in (None, ())]
    if len(given) > 1:
        raise SpecError(f"a NIC can have only one VLAN mode, got {' and '.join(given)}",
                        "choose one of --tag, --trunks or --qinq")
    qinq = qinq_of(values)
    if values.get("trunks"):
        return spec.VlanPolicy(trunks=values["trunks"])
    if values.get("tag") is not None:
        return spec.VlanPolicy(tag=values["tag"])
    return spec.VlanPolicy(qinq=qinq) if qinq else None


def qinq_of(values: Mapping[str, Any]) -> spec.QinQ | None:
    """The dot1q-tunnel settings of read values; cvlans and ethertype need an S-tag."""
    if values.get("qinq") is None:
        for field in QINQ_FIELDS[1:]:
            if values.get(field.name) not in (None, ()):
                raise SpecError(f"--{field.key} applies only to a QinQ (dot1q-tunnel) NIC",
                                f"add --qinq <S-tag>, or drop --{field.key}")
        return None
    return spec.QinQ(values["qinq"], tuple(values.get("cvlans") or ()), values.get("ethertype") or spec.EtherType.DOT1AD)


def written(nic: spec.VhostNic) -> list[tuple[str, str]]:
    """(key, text) of a NIC as the spec file holds it: defaults left out, the VLAN mode in
    its keys."""
    props = []
    for field in NIC_FIELDS:
        if field.always or getattr(nic, field.name) != field.default:
            props.append((field.key, field.write(getattr(nic, field.name))))
        if field.name == _VLAN_AFTER:
            props += vlan_written(nic.vlan)
    return props


def vlan_written(vlan: spec.VlanPolicy) -> list[tuple[str, str]]:
    props = []
    if vlan.tag is not None:
        props.append(("tag", str(vlan.tag)))
    if vlan.trunks:
        props.append(("trunks", spec.format_vlan_list(vlan.trunks)))
    if vlan.qinq:
        props.append(("qinq", str(vlan.qinq.stag)))
        if vlan.qinq.cvlans:
            props.append(("cvlans", spec.format_vlan_list(vlan.qinq.cvlans)))
        if vlan.qinq.ethertype != spec.EtherType.DOT1AD:
            props.append(("ethertype", vlan.qinq.ethertype.value))
    return props


@dataclasses.dataclass(frozen=True)
class NicChange:
    """Fields of a vhost-user NIC given on the command line ({name: value}); the VLAN mode,
    when given, as one value. What is not given stays as it is."""

    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    vlan: spec.VlanPolicy | None = None

    def applied_to(self, nic: spec.VhostNic) -> spec.VhostNic:
        changes = dict(self.values)
        if self.vlan is not None:
            changes["vlan"] = self.vlan
        return dataclasses.replace(nic, **changes)
