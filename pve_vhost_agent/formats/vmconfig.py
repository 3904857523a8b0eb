"""A Proxmox VM config file as text that writes back byte for byte.

Pure: no I/O. Lines are classified the way qemu-server's `parse_vm_config` reads them
(`key: value`, `#` description lines, `[PENDING]`, `[special:...]`, `[<snapshot>]`),
but the text is kept as it is: an edit changes, adds or removes exactly one line, so the
user's own keys, order, blank lines and description survive every write the agent makes.
"""

from __future__ import annotations

import dataclasses
import re

from pve_vhost_agent.errors import ConfigConflict

MAIN = "main"
PENDING = "pending"

# qemu-server's own patterns (Perl `\s` is ASCII whitespace, hence re.ASCII).
_BLANK = re.compile(r"^\s*$", re.ASCII)
_PENDING_HEADER = re.compile(r"^\[PENDING\]\s*$", re.ASCII | re.IGNORECASE)
_SPECIAL_HEADER = re.compile(r"^\[special:([a-z]+)\]\s*$", re.ASCII | re.IGNORECASE)
_SNAPSHOT_HEADER = re.compile(r"^\[([a-z][a-z0-9_\-]+)\]\s*$", re.ASCII | re.IGNORECASE)
_COMMENT = re.compile(r"^#(.*)$", re.ASCII)
_KEY_LINE = re.compile(r"^([a-z][a-z_\-]*\d*):\s*(.+?)\s*$", re.ASCII)
_KEY = re.compile(r"^[a-z][a-z_\-]*\d*$", re.ASCII)


def encode_text(text: str) -> str:
    """Text as qemu-server writes a description line (pve-common `encode_text`): control
    and non-ASCII bytes, `%` and `:` URI-escaped."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b not in (0x25, 0x3A) else f"%{b:02X}"
                   for b in text.encode("utf-8"))


def tag_list(value: str) -> list[str]:
    """The tags of a `tags:` value (Proxmox splits on `;`, `,` and white space)."""
    return [tag for tag in re.split(r"[;,\s]+", value) if tag]


def with_tag(value: str, tag: str, present: bool) -> str:
    """A `tags:` value with `tag` added at the end (`;`, as Proxmox writes) or removed;
    the user's other tags and separators unchanged ("" when none is left)."""
    if present:
        return value if tag in tag_list(value) else (f"{value};{tag}" if value.strip() else tag)
    kept = re.sub(rf"(^|[;,\s]+){re.escape(tag)}(?=$|[;,\s])", "", value)
    return re.sub(r"^[;,\s]+", "", kept)


@dataclasses.dataclass(frozen=True)
class _Line:
    """One line of a VM config and where it belongs."""

    text: str  # without its newline
    section: str  # the section it belongs to: main, pending, special:NAME, snapshot:NAME
    part: int  # which header opened it (0: main); Proxmox keeps the last of repeated headers
    kind: str  # header | key | comment | blank | other (ignored by Proxmox, kept by us)
    key: str = ""
    value: str = ""


def _header_section(line: str) -> str | None:
    if _PENDING_HEADER.match(line):
        return PENDING
    special = _SPECIAL_HEADER.match(line)
    if special:
        return f"special:{special.group(1).lower()}"
    snapshot = _SNAPSHOT_HEADER.match(line)
    if snapshot:
        return f"snapshot:{snapshot.group(1)}"
    return None


def _classify(lines: list[str]) -> tuple[_Line, ...]:
    section, part = MAIN, 0
    out = []
    for text in lines:
        header = _header_section(text)
        if header is not None:
            section, part = header, part + 1
            out.append(_Line(text, section, part, "header"))
            continue
        if _BLANK.match(text):
            out.append(_Line(text, section, part, "blank"))
            continue
        if _COMMENT.match(text):
            out.append(_Line(text, section, part, "comment"))
            continue
        match = _KEY_LINE.match(text)
        # `delete:` outside [PENDING] is an error Proxmox skips over; so do we.
        if match and not (match.group(1) == "delete" and section != PENDING):
            out.append(_Line(text, section, part, "key", match.group(1), match.group(2)))
        else:
            out.append(_Line(text, section, part, "other"))
    return tuple(out)


def _check_value(key: str, value: str) -> None:
    """A value the agent writes must read back exactly as written, on one line: no control
    character (a tab is fine), no blanks at its ends (ConfigConflict: the VM's own text)."""
    bad = next((i for i, char in enumerate(value) if (char < " " and char != "\t") or char == "\x7f"), None)
    if bad is not None:
        raise ConfigConflict(
            f"the VM's {key} has a control character (U+{ord(value[bad]):04X}) at character {bad + 1}, "
            "which the agent does not write into a VM config",
            f"remove it from the VM's {key} (qm set VMID --{key} '...'), then run the command again")
    match = _KEY_LINE.match(f"{key}: {value}")
    if match is None or match.group(2) != value:
        raise ConfigConflict(f"the VM's {key} {value[:40]!r} would not read back as written (empty, or blanks at its ends)",
                             f"fix the VM's {key} (qm set VMID --{key} '...')")


@dataclasses.dataclass(frozen=True)
class VmConfig:
    """One VM config file. `lines` have no newline; `final_newline` says if the text ends in one."""

    lines: tuple[_Line, ...]
    final_newline: bool

    @classmethod
    def parse(cls, text: str) -> "VmConfig":
        if text == "":
            return cls((), False)
        final_newline = text.endswith("\n")
        raw = (text[:-1] if final_newline else text).split("\n")
        return cls(_classify(raw), final_newline)

    @property
    def text(self) -> str:
        if not self.lines:
            return ""
        return "\n".join(line.text for line in self.lines) + ("\n" if self.final_newline else "")

    def sections(self) -> list[str]:
        """Section names in file order: main first, then pending, special:X, snapshot:X."""
        return [MAIN] + [line.section for line in self.lines if line.kind == "header"]

    def section(self, name: str = MAIN) -> dict[str, str]:
        """The keys of one section, in file order; a repeated key keeps its last value."""
        values: dict[str, str] = {}
        for line in self._lines_of(name):
            if line.kind == "key":
                values.pop(line.key, None)
                values[line.key] = line.value
        return values

    @property
    def pending_delete(self) -> tuple[str, ...]:
        """Keys `[PENDING]` deletes at the next start (`!key` forces; the `!` is dropped)."""
        raw = self.section(PENDING).get("delete", "")
        return tuple(item.lstrip("!") for item in re.split(r"[,;\s]+", raw) if item.lstrip("!"))

    def effective(self) -> dict[str, str]:
        """What the next start uses: qemu-server applies pending deletes, then pending values."""
        deleted = set(self.pending_delete)
        values = {k: v for k, v in self.section(MAIN).items() if k not in deleted}
        for key, value in self.section(PENDING).items():
            if key != "delete":
                values[key] = value
        return values

    def with_value(self, key: str, value: str | None, section: str = MAIN) -> "VmConfig":
        """A copy where `key` of `section` (main or pending) is `value`, or gone if None.

        Exactly one line changes, appears or goes (plus the `[PENDING]` header when that
        section has to appear or becomes empty). A new key goes where qemu-server would
        write it: keys in alphabetical order.
        """
        if section not in (MAIN, PENDING):
            raise ValueError(f"the agent writes only the main and pending sections, not {section!r}")
        if not _KEY.match(key) or key in ("delete", "description"):
            raise ValueError(f"{key!r} is not a key the agent may write")
        if value is not None:
            _check_value(key, value)
        part = self._part(section)
        lines = [line.text for line in self.lines]
        at = [i for i, line in enumerate(self.lines) if line.part == part and line.kind == "key" and line.key == key]
        if value is None:
            for i in reversed(at):
                del lines[i]
            config = self._relined(lines)
            return config._without_empty_pending() if section == PENDING and at else config
        new_line = f"{key}: {value}"
        if at:
            # Proxmox reads the last of repeated keys: change that one, drop the others.
            lines[at[-1]] = new_line
            for i in reversed(at[:-1]):
                del lines[i]
            return self._relined(lines)
        if part is None:  # no [PENDING] yet: Proxmox writes it right after the main keys
            end = self._end_of(0)
            return self._relined(lines[:end] + ["", "[PENDING]", new_line] + lines[end:])
        where = self._insert_at(part, key)
        return self._relined(lines[:where] + [new_line] + lines[where:])

    def description_lines(self) -> tuple[str, ...]:
        """The main section's `#` lines, as written (URI-escaped, without the `#`)."""
        return tuple(line.text[1:] for line in self.lines if line.part == 0 and line.kind == "comment")

    def with_description_line(self, prefix: str, text: str | None) -> "VmConfig":
        """A copy where the one description line starting with `#<prefix>` is `#<text>`
        (`text` starts with `prefix`), or gone if None; every other line as it was.

        A new line goes after the last line of the description (at the top of the file
        when it has none), where Proxmox keeps it when it rewrites the config.
        """
        if text is not None and (not text.startswith(prefix) or "\n" in text or "\r" in text):
            raise ValueError(f"a description line must start with {prefix!r} and be one line")
        lines = [line.text for line in self.lines]
        at = [i for i, line in enumerate(self.lines)
              if line.part == 0 and line.kind == "comment" and line.text[1:].startswith(prefix)]
        if text is None:
            for i in reversed(at):
                del lines[i]
            return self._relined(lines)
        if at:
            lines[at[-1]] = f"#{text}"
            for i in reversed(at[:-1]):
                del lines[i]
            return self._relined(lines)
        comments = [i for i, line in enumerate(self.lines) if line.part == 0 and line.kind == "comment"]
        where = comments[-1] + 1 if comments else 0
        return self._relined(lines[:where] + [f"#{text}"] + lines[where:])

    def with_pending_delete(self, key: str, deleted: bool) -> "VmConfig":
        """A copy where `[PENDING]`'s `delete:` list has `key` (deleted) or not.

        `qm set` drops a key from that list when it writes the key, and adds it for
        `--delete key` on a running VM. Only the `delete:` line changes (it appears first
        in `[PENDING]`, as Proxmox writes it, or goes when its list becomes empty).
        """
        if not _KEY.match(key) or key in ("delete", "description"):
            raise ValueError(f"{key!r} is not a key the agent may delete")
        part = self._part(PENDING)
        at = [i for i, line in enumerate(self.lines)
              if part is not None and line.part == part and line.kind == "key" and line.key == "delete"]
        items = [item for item in re.split(r"[,;\s]+", self.lines[at[-1]].value) if item] if at else []
        kept = [item for item in items if item.lstrip("!") != key]
        if deleted == (len(kept) != len(items)):
            return self  # already as asked
        lines = [line.text for line in self.lines]
        if deleted:
            new_line = "delete: " + ",".join(items + [key])
            if at:
                lines[at[-1]] = new_line
                return self._relined(lines)
            if part is None:
                end = self._end_of(0)
                return self._relined(lines[:end] + ["", "[PENDING]", new_line] + lines[end:])
            header = next(i for i, line in enumerate(self.lines) if line.part == part)
            return self._relined(lines[:header + 1] + [new_line] + lines[header + 1:])
        if kept:
            lines[at[-1]] = "delete: " + ",".join(kept)
            return self._relined(lines)
        for i in reversed(at):
            del lines[i]
        return self._relined(lines)._without_empty_pending()

    # --- helpers ---------------------------------------------------------------------

    def _part(self, name: str) -> int | None:
        if name == MAIN:
            return 0
        parts = [line.part for line in self.lines if line.kind == "header" and line.section == name]
        return parts[-1] if parts else None

    def _lines_of(self, name: str) -> list[_Line]:
        part = self._part(name)
        return [line for line in self.lines if line.part == part]

    def _relined(self, lines: list[str]) -> "VmConfig":
        # An empty file gains a final newline with its first line, as Proxmox writes it.
        return VmConfig(_classify(lines), self.final_newline or not self.lines)

    def _end_of(self, part: int) -> int:
        """Index just after the last non-blank line of a section (its header if it has none)."""
        end = 0
        for i, line in enumerate(self.lines):
            if line.part == part and line.kind != "blank":
                end = i + 1
        return end

    def _insert_at(self, part: int, key: str) -> int:
        for i, line in enumerate(self.lines):
            if line.part == part and line.kind == "key" and line.key > key:
                return i
        return self._end_of(part)

    def _without_empty_pending(self) -> "VmConfig":
        part = self._part(PENDING)
        if any(line.part == part and line.kind not in ("header", "blank") for line in self.lines):
            return self
        header = next(i for i, line in enumerate(self.lines) if line.part == part)
        # Drop the header and the blank line Proxmox writes before it; blank lines after
        # it now separate whatever follows (the exact inverse of creating the section).
        gone = {header - 1, header} if header > 0 and self.lines[header - 1].kind == "blank" else {header}
        kept = [line.text for i, line in enumerate(self.lines) if i not in gone]
        return VmConfig(_classify(kept), self.final_newline)
