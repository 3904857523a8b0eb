"""Where a snippet volume (`<storage>:snippets/<file>`) lives on disk (pve-storage rules).

Proxmox resolves a hookscript volume through /etc/pve/storage.cfg: file-based storages
(dir, nfs, cifs, cephfs, glusterfs, btrfs) have a `path`, and snippets sit in its
`snippets/` folder. `local` exists even when storage.cfg does not mention it.
"""

from __future__ import annotations

from pathlib import Path

from pve_vhost_agent.errors import AgentError, ConfigConflict, NotFound
from pve_vhost_agent.settings import Settings

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


def storage_path(settings: Settings, storage: str) -> Path:
    """The folder of a file-based storage (under the settings' root)."""
    cfg = settings.pve_dir / "storage.cfg"
    try:
        paths = parse_storage_paths(cfg.read_text())
    except FileNotFoundError:
        paths = {}
    except OSError as err:
        raise AgentError(f"cannot read {cfg}: {err.strerror}", "check /etc/pve (is pve-cluster running?)") from err
    if storage not in paths:
        if storage == "local":
            return settings.host_path(DEFAULT_LOCAL_PATH)
        raise NotFound(f"storage {storage!r} is not in {cfg}", "use a storage listed by `pvesm status`")
    path = paths[storage] or (DEFAULT_LOCAL_PATH if storage == "local" else None)
    if path is None:
        raise ConfigConflict(f"storage {storage!r} has no folder for snippets",
                             "use a file-based storage (dir, nfs, cifs, cephfs) with content type snippets")
    return settings.host_path(path)


def snippets_dir(settings: Settings, storage: str) -> Path:
    return storage_path(settings, storage) / "snippets"


def snippet_path(settings: Settings, volume: str) -> Path:
    """`local:snippets/hook.pl` -> /var/lib/vz/snippets/hook.pl (under the root)."""
    storage, _sep, volname = volume.partition(":")
    if not volname.startswith("snippets/") or "/" in volname.removeprefix("snippets/"):
        raise ConfigConflict(f"hookscript {volume!r} is not a snippet volume",
                             "use <storage>:snippets/<file>, as `qm set --hookscript` does")
    return snippets_dir(settings, storage) / volname.removeprefix("snippets/")
