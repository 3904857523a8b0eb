"""/etc/pve/storage.cfg: which folder holds a storage's snippets (pve-storage rules). Pure.

Proxmox resolves a hookscript volume `<storage>:snippets/<file>` through storage.cfg
(pve-storage `PVE::Storage::Plugin::get_subdir`): the storage's `path`, then the
`snippets` entry of its `content-dirs` option when it has one (`content-dirs
snippets=hooks,iso=isos`, split on `,`, `;` and white space as pve-common `split_list`
does), else `snippets`. File-based storages (dir, nfs, cifs, cephfs, glusterfs, btrfs)
have a `path`. `local` always exists as a `dir` storage at /var/lib/vz: when storage.cfg
lacks it, or gives it another type or path, pve-storage's `parse_config` puts the default
in its place (and with it no `content-dirs`).
"""

from __future__ import annotations

import dataclasses
import re

DEFAULT_LOCAL_PATH = "/var/lib/vz"
SNIPPETS = "snippets"


@dataclasses.dataclass(frozen=True)
class Storage:
    """A storage of storage.cfg: its type, path and content folders."""

    kind: str  # dir, nfs, lvm, ...
    path: str | None = None
    content_dirs: tuple[tuple[str, str], ...] = ()  # (content type, folder relative to path)

    def subdir(self, content: str) -> str:
        """The folder of `content` under `path` (Plugin::get_subdir)."""
        return dict(self.content_dirs).get(content, content)


LOCAL = Storage("dir", DEFAULT_LOCAL_PATH)


def parse_storages(text: str) -> dict[str, Storage]:
    """storage id -> its type, `path` and `content-dirs`, with `local` as pve-storage makes it."""
    raw: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            kind, _sep, ident = line.partition(":")
            current = ident.strip()
            kinds[current], raw[current] = kind.strip().lower(), {}
        elif current is not None:
            key, _sep, value = line.strip().partition(" ")
            raw[current][key] = value.strip()
    storages = {ident: Storage(kinds[ident], values.get("path"), _content_dirs(values.get("content-dirs", "")))
                for ident, values in raw.items()}
    local = storages.get("local")
    if local is None or local.kind != "dir" or (local.path and local.path != DEFAULT_LOCAL_PATH):
        storages["local"] = LOCAL
    elif not local.path:
        storages["local"] = dataclasses.replace(local, path=DEFAULT_LOCAL_PATH)
    return storages


def _content_dirs(value: str) -> tuple[tuple[str, str], ...]:
    """`snippets=hooks,iso=isos` -> (("snippets", "hooks"), ("iso", "isos"))."""
    pairs = []
    for item in re.split(r"[,;\s]+", value.strip()):
        content, sep, folder = item.partition("=")
        if sep and content and folder:
            pairs.append((content, folder))
    return tuple(pairs)
