"""The `args:` line of a VM config: Proxmox's split of it, and the agent's own part of it.

Proxmox (qemu-server `config_to_command`) splits `args:` with Perl's
`Text::ParseWords::shellwords` and appends the words after everything it generates. The
split here is the same, with each word's span in the line, so the agent can replace its
own part and leave every byte of the user's part alone.

Ownership is by id (the agent never stores a marker in the VM config; Proxmox rejects
unknown keys):
- `-chardev`, `-netdev`, `-device` with `id=vhu-net<N>` (N = 0..31, the NIC index),
- `-object` with `id=vhu-mem` (the shared memory backend),
- `-machine memory-backend=vhu-mem` (exactly that, nothing else in the value).
Each such option and its value form one agent-owned pair. Every other id or reference
starting with `vhu-` is reserved: a user option using one is refused, never taken over.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Sequence

from pve_vhost_agent.errors import ConfigConflict, SpecError
from pve_vhost_agent.model.names import ARGS_MEMORY_ID, ARGS_PREFIX, args_nic_index

# Perl's \s on a byte string: these six, nothing else.
WHITESPACE = " \t\n\r\f\v"
MACHINE_MEMORY = f"memory-backend={ARGS_MEMORY_ID}"
# Agent args are joined with single spaces and never quoted: they may hold only these.
_AGENT_ARG = re.compile(r"^[A-Za-z0-9_.,:/=-]+$")
# The option the first, key-less item of a value stands for (QEMU's "implied" key).
_IMPLIED_KEY = {
    "chardev": "backend", "netdev": "type", "nic": "type", "device": "driver",
    "object": "qom-type", "machine": "type", "M": "type", "numa": "type", "m": "size",
    "mem-path": "path",
}
# Keys whose value names a chardev, netdev, memory backend or device.
_REFERENCE_KEYS = ("id", "chardev", "netdev", "memdev", "memory-backend")



@dataclasses.dataclass(frozen=True)
class Token:
    """One argument: `text` is what QEMU receives, `line[start:end]` is how it is written."""

    text: str
    start: int
    end: int


# One piece of a word: plain text, a "..." or '...' group (a backslash in it always pairs
# with the next character, so an escaped quote does not close it), or a backslash and the
# character it escapes. A word is its pieces glued together.
_PIECE = re.compile(r"""([^ \t\n\r\f\v"'\\]+)|"([^"\\]*(?:\\.[^"\\]*)*)"|'([^'\\]*(?:\\.[^'\\]*)*)'|\\(.)""", re.S)
_BLANKS = re.compile(r"[ \t\n\r\f\v]*")
_ESCAPED = re.compile(r"\\(.)", re.S)


def _broken(line: str, pos: int, what: str) -> ConfigConflict:
    return ConfigConflict(
        f"the args line has {what} at character {pos + 1}: Proxmox would drop the whole line",
        "fix the quoting in the VM's args (qm set VMID --args '...')",
    )


def split_args(line: str) -> tuple[Token, ...]:
    """The words Proxmox passes to QEMU for `args: <line>` (Text::ParseWords `shellwords`).

    Whitespace separates words; "..." and '...' group, and glue to neighbouring text. A
    backslash escapes the next character outside quotes and inside "..."; inside '...'
    it only keeps a quote from closing and stays in the word. An unbalanced quote or a
    trailing backslash makes Perl return no words at all (and `0` is no args to Perl):
    the first is refused here, not silently dropped.
    """
    if not line.isascii():
        for pos, char in enumerate(line):
            if ord(char) > 127 and char.isspace():
                raise ConfigConflict(
                    f"the args line has a non-ASCII blank (U+{ord(char):04X}) at character {pos + 1}, "
                    "which Proxmox may or may not read as a separator",
                    "replace it with a plain space in the VM's args",
                )
    if line == "0":
        return ()
    tokens: list[Token] = []
    pos, size = 0, len(line)
    while True:
        pos = _BLANKS.match(line, pos).end()
        if pos == size:
            return tuple(tokens)
        start, parts = pos, []
        while pos < size and line[pos] not in WHITESPACE:
            piece = _PIECE.match(line, pos)
            if piece is None:  # an unclosed quote, or a backslash that ends the line
                raise _broken(line, pos, "a trailing backslash" if line[pos] == "\\" else "an unbalanced quote")
            plain, double, single, escaped = piece.groups()
            if double is not None:
                plain = _ESCAPED.sub(r"\1", double)
            parts.append(plain if plain is not None else single if single is not None else escaped)
            pos = piece.end()
        tokens.append(Token("".join(parts), start, pos))


def parse_qemu_opts(value: str, implied_key: str | None = None) -> dict[str, str]:
    """QEMU's `key=value,...` option syntax (`,,` is a literal comma), or its JSON form."""
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            return {}
        if not isinstance(data, dict):
            return {}
        props = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
        if isinstance(data.get("addr"), int):
            # A JSON number is a devfn (slot << 3 | function): give it the string form.
            props["addr"] = f"0x{data['addr'] >> 3:x}.{data['addr'] & 7}"
        return props
    props: dict[str, str] = {}
    for i, item in enumerate(value.replace(",,", "\0").split(",")):
        item = item.replace("\0", ",")
        key, sep, val = item.partition("=")
        if not sep:
            if i == 0 and implied_key:
                key, val = implied_key, item
            elif not item:
                continue
            else:
                val = "on"
        props[key] = val
    return props


@dataclasses.dataclass(frozen=True)
class OptionPair:
    """A QEMU option the agent cares about and its value, e.g. `-device` + `virtio-net-pci,...`."""

    option: Token
    value: Token

    @property
    def kind(self) -> str:
        """The option's name without dashes (QEMU takes `-device` and `--device` alike)."""
        return self.option.text.lstrip("-")

    @property
    def props(self) -> dict[str, str]:
        return parse_qemu_opts(self.value.text, _IMPLIED_KEY.get(self.kind))

    def written(self, line: str) -> str:
        return line[self.option.start:self.value.end]


def _option_name(token: Token) -> str | None:
    text = token.text
    if text.startswith("--"):
        text = text[1:]
    if text.startswith("-") and text[1:] in _IMPLIED_KEY:
        return text[1:]
    return None


def _option_indices(tokens: Sequence[Token]) -> list[int]:
    """Where each option of `_IMPLIED_KEY` that has a value stands (its value is the next word)."""
    found, i = [], 0
    while i < len(tokens):
        if _option_name(tokens[i]) and i + 1 < len(tokens):
            found.append(i)
            i += 2
        else:
            i += 1
    return found


def option_pairs(tokens: Sequence[Token]) -> list[OptionPair]:
    """The options of `_IMPLIED_KEY` with their values; other words are passed over."""
    return [OptionPair(tokens[i], tokens[i + 1]) for i in _option_indices(tokens)]


def _may_name_agent(value: str) -> bool:
    """False when no property of `value` can hold a name starting with ARGS_PREFIX: in
    `key=value,...` every property is written out (`,,` only doubles a comma), so a
    value without the prefix needs no parsing; JSON may escape it, so it is parsed."""
    return ARGS_PREFIX in value or value.lstrip().startswith("{")


def is_agent_owned(pair: OptionPair) -> bool:
    if not _may_name_agent(pair.value.text):
        return False  # each owned pair names vhu-net<N> or vhu-mem
    kind, props = pair.kind, pair.props
    if kind in ("chardev", "netdev", "device"):
        return args_nic_index(props.get("id", "")) is not None
    if kind == "object":
        return props.get("id") == ARGS_MEMORY_ID
    if kind in ("machine", "M"):
        return props == {"memory-backend": ARGS_MEMORY_ID}
    return False


def _pair_indices(tokens: Sequence[Token], owned_only: bool = True) -> set[int]:
    """Indices of the words in option pairs (the agent-owned ones only, by default)."""
    found = set()
    for i in _option_indices(tokens):
        if not owned_only or is_agent_owned(OptionPair(tokens[i], tokens[i + 1])):
            found.update((i, i + 1))
    return found


def _owned_indices(tokens: Sequence[Token]) -> set[int]:
    return _pair_indices(tokens)


def _check_no_swallowed_option(line: str, tokens: Sequence[Token]) -> None:
    """Refuse a word outside any option that holds one of the agent's names: the word
    before it (an option without its value, or a trailing backslash that glued the next
    word on) took the agent's option as its value, so QEMU would not get that option."""
    paired = _pair_indices(tokens, owned_only=False)
    for i, token in enumerate(tokens):
        props = {} if i in paired or not _may_name_agent(token.text) else parse_qemu_opts(token.text)
        key = next((k for k in _REFERENCE_KEYS if props.get(k, "").startswith(ARGS_PREFIX)), None)
        if key is not None:
            before = line[tokens[max(i - 2, 0)].start:tokens[i - 1].end] if i else ""
            raise ConfigConflict(
                f"the args line has `{line[token.start:token.end][:60]}` (with {key}={props[key]}, a name of the "
                f"agent's) where an option should be: a word of `{before[:60]}` before it (an option without its "
                "value, or a trailing backslash) took the agent's option as its own",
                "complete or remove that word in the VM's args (qm set VMID --args '...'), then run "
                "`pve-vhost-agent apply VMID`")


def agent_args(line: str) -> tuple[str, ...]:
    """The agent-owned words of an args line, in their order (as Proxmox passes them)."""
    tokens = split_args(line)
    owned = _owned_indices(tokens)
    return tuple(t.text for i, t in enumerate(tokens) if i in owned)


def check_agent_args(args: Sequence[str]) -> tuple[str, ...]:
    """Refuse agent args that would need quoting or that the agent would not own."""
    for arg in args:
        if not isinstance(arg, str) or not _AGENT_ARG.match(arg):
            raise SpecError(
                f"agent argument {arg!r} has a character that Proxmox's split or QEMU would read differently",
                "use only A-Z a-z 0-9 _ . , : / = - in names, paths and MACs",
            )
    joined = " ".join(args)
    if agent_args(joined) != tuple(args):
        raise SpecError(
            f"agent arguments {joined!r} are not all agent-owned option/value pairs",
            "this is a bug in pve-vhost-agent: report it",
        )
    return tuple(args)


def merge_agent_args(line: str, new_agent_args: Sequence[str]) -> str:
    """`line` without its agent-owned pairs, with `new_agent_args` appended at the end.

    The user's words stay byte for byte, in order, with the blanks that followed them;
    leading and trailing blanks go (Proxmox trims the value when it reads it anyway).
    """
    new = check_agent_args(new_agent_args)
    tokens = split_args(line)
    _check_no_swallowed_option(line, tokens)
    owned = _owned_indices(tokens)
    kept = [i for i in range(len(tokens)) if i not in owned]
    pieces = []
    for n, i in enumerate(kept):
        pieces.append(line[tokens[i].start:tokens[i].end])
        if n + 1 < len(kept):
            # The blanks written right after this word separate it from the next kept one.
            pieces.append(line[tokens[i].end:tokens[i + 1].start])
    user = "".join(pieces)
    merged = " ".join(part for part in (user, " ".join(new)) if part)
    if agent_args(merged) != new:
        # The user's args end with an option that takes a value: ours would become it.
        raise ConfigConflict(
            f"the args line ends with `{line[tokens[kept[-1]].start:tokens[kept[-1]].end]}` without its value, "
            "so the agent's args appended after it would be read as that value",
            "complete or remove that option in the VM's args (qm set VMID --args '...')",
        )
    return merged


def pci_slot(props: dict[str, str], root_bus: str) -> tuple[str, int] | None:
    """(bus, slot) of a `-device` with an `addr=` (`0x12`, `12`, `0x12.0`: hex slot[.function])."""
    addr = props.get("addr")
    if addr is None:
        return None
    try:
        slot = int(addr.split(".", 1)[0], 16)
    except ValueError:
        return None
    return props.get("bus", root_bus), slot


def check_user_args(line: str, planned: Sequence[str], vmid: int, root_bus: str = "pci.0") -> None:
    """Refuse user args that clash with the planned agent args (ConfigConflict naming both)."""
    tokens = split_args(line)
    _check_no_swallowed_option(line, tokens)
    plan_pairs = option_pairs(split_args(" ".join(planned)))
    slots = {}
    for pair in plan_pairs:
        if pair.kind == "device":
            slots[pci_slot(pair.props, root_bus)] = pair.props["id"]
    hubs = {pair.props.get("hubid"): pair.props["id"] for pair in plan_pairs
            if pair.kind == "netdev" and pair.props.get("type") == "hubport"}
    adds_memory = any(pair.kind == "object" for pair in plan_pairs)
    for pair in option_pairs(tokens):
        if is_agent_owned(pair):
            continue
        problem = _clash(pair, slots, adds_memory, root_bus, vmid) or _hub_clash(pair, hubs, vmid)
        if problem:
            reason, fix = problem
            raise ConfigConflict(f"VM {vmid} args have `{pair.written(line)}`, which {reason}", fix)


def _hub_clash(pair: OptionPair, hubs: dict, vmid: int) -> tuple[str, str] | None:
    """A hub port of the user's on the QEMU hub of a link end would join that link."""
    if pair.kind in ("netdev", "nic") and pair.props.get("hubid") in hubs:
        return (f"joins QEMU hub {pair.props['hubid']}, the hub of the agent's link end {hubs[pair.props['hubid']]}",
                f"give it another hubid in the VM's args (qm set {vmid} --args '...')")
    return None


def _clash(pair: OptionPair, slots: dict, adds_memory: bool, root_bus: str, vmid: int) -> tuple[str, str] | None:
    kind, props = pair.kind, pair.props
    for key in _REFERENCE_KEYS:
        if props.get(key, "").startswith(ARGS_PREFIX):
            return (f"uses {key}={props[key]}, a name reserved for pve-vhost-agent",
                    f"rename it in the VM's args (qm set {vmid} --args '...'): names starting with {ARGS_PREFIX} are the agent's")
    if kind in ("netdev", "nic") and props.get("type") == "vhost-user":
        return ("is a hand-written vhost-user NIC",
                f"remove it from the VM's args and declare the NIC with `pve-vhost-agent nic add {vmid} netN ...`")
    if kind == "device":
        slot = pci_slot(props, root_bus)
        if slot in slots:
            return (f"takes {slot[0]} slot 0x{slot[1]:x}, the slot of the agent's {slots[slot]}",
                    "move that device to another bus or addr, or give the vhost-user NIC another netN index")
    if kind == "numa":
        return ("adds a NUMA node whose memory the agent cannot share with the vhost-user backend",
                f"remove it from args; for NUMA use `qm set {vmid} --numa 1 --hugepages 2`")
    if kind == "object" and props.get("qom-type", "").startswith("memory-backend"):
        return ("adds a memory backend next to the guest memory the agent shares",
                "remove it from args: the agent sets up shared guest memory itself")
    if kind in ("machine", "M") and "memory-backend" in props:
        return ("picks a guest memory backend, which the agent does itself",
                "remove memory-backend= from that -machine in args")
    if adds_memory and kind in ("m", "mem-path"):
        return ("changes guest memory that must match the agent's shared backend",
                f"remove it from args and set the size with `qm set {vmid} --memory MiB`")
    return None
