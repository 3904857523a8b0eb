"""Where a snippet volume (`<storage>:snippets/<file>`) lives on disk: reads /etc/pve/storage.cfg."""

from __future__ import annotations

from pathlib import Path

from pve_vhost_agent.adapters import pvefs
from pve_vhost_agent.errors import ConfigConflict, NotFound
from pve_vhost_agent.formats.storagecfg import DEFAULT_LOCAL_PATH, parse_storage_paths
from pve_vhost_agent.settings import Settings


def storage_path(settings: Settings, storage: str) -> Path:
    """The folder of a file-based storage (under the settings' root)."""
    cfg = settings.pve_dir / "storage.cfg"
    text = pvefs.read_text(cfg)  # any byte: one that is not UTF-8 stays what it is, as Proxmox reads it
    paths = parse_storage_paths(text) if text is not None else {}
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
