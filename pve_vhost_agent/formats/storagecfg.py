"""/etc/pve/storage.cfg: which storage keeps its files in which folder (pve-storage rules). Pure.

Proxmox resolves a hookscript volume through /etc/pve/storage.cfg: file-based storages
(dir, nfs, cifs, cephfs, glusterfs, btrfs) have a `path`, and snippets sit in its
`snippets/` folder. `local` exists even when storage.cfg does not mention it.
"""

from __future__ import annotations

DEFAULT_LOCAL_PATH = "/var/lib/vz"


def parse_storage_paths(text: str) -> dict[str, str | None]:
    """storage id -> its `path` (None for storages without one, e.g. lvm, rbd)."""
    storages: dict[str, str | None] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            _kind, _sep, ident = line.partition(":")
            current = ident.strip()
            storages[current] = None
        elif current is not None:
            key, _sep, value = line.strip().partition(" ")
            if key == "path":
                storages[current] = value.strip()
    return storages
