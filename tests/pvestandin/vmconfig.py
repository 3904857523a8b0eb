"""VM config files as qemu-server reads and writes them (`parse_vm_config`/`write_vm_config`).

A config is a main section of `key: value` lines (leading `#` lines are the description),
then optional `[PENDING]` (with `delete: a,b`), `[special:...]` and snapshot sections.
Only the parts the stand-in needs are typed; other sections are kept as raw lines.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from urllib.parse import quote, unquote

_KEY_LINE = re.compile(r"^([a-z][a-z_\-]*\d*):\s*(.+?)\s*$")
_ARGS_LINE = re.compile(r"^(args):\s*(.*\S)\s*$")
_SECTION = re.compile(r"^\[([^\]]*)\]\s*$")


@dataclasses.dataclass
class VmConfig:
    """One VM config file. `main` and `pending` keep their key order as read."""

    description: str | None = None
    main: dict[str, str] = dataclasses.field(default_factory=dict)
    pending: dict[str, str] = dataclasses.field(default_factory=dict)
    pending_delete: list[str] = dataclasses.field(default_factory=list)
    # "[name]" -> raw lines of sections the stand-in does not interpret (snapshots, special)
    other_sections: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def has_pending(self) -> bool:
        return bool(self.pending or self.pending_delete)

    def apply_pending(self) -> None:
        """What `vmconfig_apply_pending` does for plain options: deletes, then new values."""
        for key in self.pending_delete:
            self.main.pop(key.lstrip("!"), None)
        self.main.update(self.pending)
        self.pending = {}
        self.pending_delete = []


def parse(text: str) -> VmConfig:
    conf = VmConfig()
    section: dict[str, str] | None = conf.main
    raw_section: list[str] | None = None
    descr: list[str] = []
    in_main = True
    for line in text.split("\n"):
        if not line.strip():
            continue
        header = _SECTION.match(line)
        if header:
            if in_main and descr:
                conf.description = "\n".join(descr)
            in_main = False
            name = header.group(1)
            if name.upper() == "PENDING":
                section, raw_section = conf.pending, None
            else:
                section, raw_section = None, conf.other_sections.setdefault(name, [])
            continue
        if raw_section is not None:
            raw_section.append(line)
            continue
        if line.startswith("#"):
            if in_main:
                descr.append(unquote(line[1:]))
            continue
        match = _ARGS_LINE.match(line) or _KEY_LINE.match(line)
        if not match:
            raise ValueError(f"unable to parse config: {line}")
        key, value = match.groups()
        if key == "delete" and section is conf.pending:
            conf.pending_delete = [k.strip() for k in value.split(",") if k.strip()]
        elif key == "description" and in_main:
            descr.append(unquote(value))
        else:
            section[key] = value
    if in_main and descr:
        conf.description = "\n".join(descr)
    return conf


def dump(conf: VmConfig) -> str:
    """The file text, the way `write_vm_config` lays it out (keys sorted)."""
    out = []
    if conf.description:
        out += ["#" + quote(line, safe=" !\"#$&'()*+,-./;<=>?@[\\]^_`{|}~") for line in conf.description.split("\n")]
    out += [f"{k}: {conf.main[k]}" for k in sorted(conf.main)]
    if conf.has_pending():
        out += ["", "[PENDING]"]
        if conf.pending_delete:
            out.append("delete: " + ",".join(conf.pending_delete))
        out += [f"{k}: {conf.pending[k]}" for k in sorted(conf.pending)]
    for name, lines in conf.other_sections.items():
        out += ["", f"[{name}]", *lines]
    return "\n".join(out) + "\n"


def load(path: Path) -> VmConfig:
    return parse(path.read_text())


def write(path: Path, conf: VmConfig) -> None:
    """Write through a temp file and rename, as pmxcfs users do."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(dump(conf))
    os.replace(tmp, path)
