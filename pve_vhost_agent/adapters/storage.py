"""Where a snippet volume (`<storage>:snippets/<file>`) lives on disk: reads /etc/pve/storage.cfg
and resolves it as Proxmox does (formats/storagecfg: the storage's path and content-dirs)."""

from __future__ import annotations

from pathlib import Path

from pve_vhost_agent.errors import AgentError, ConfigConflict, NotFound
from pve_vhost_agent.formats.storagecfg import LOCAL, SNIPPETS, Storage, parse_storages
from pve_vhost_agent.settings import Settings


def storage(settings: Settings, name: str) -> Storage:
    cfg = settings.pve_dir / "storage.cfg"
    try:
        storages = parse_storages(cfg.read_text())
    except FileNotFoundError:
        storages = {"local": LOCAL}
    except OSError as err:
        raise AgentError(f"cannot read {cfg}: {err.strerror}", "check /etc/pve (is pve-cluster running?)") from err
    if name not in storages:
        raise NotFound(f"storage {name!r} is not in {cfg}", "use a storage listed by `pvesm status`")
    return storages[name]


def storage_path(settings: Settings, name: str) -> Path:
    """The folder of a file-based storage (under the settings' root)."""
    found = storage(settings, name)
    if not found.path:
        raise ConfigConflict(f"storage {name!r} has no folder for snippets",
                             "use a file-based storage (dir, nfs, cifs, cephfs) with content type snippets")
    return settings.host_path(found.path)


def snippets_dir(settings: Settings, name: str) -> Path:
    """`path`/`content-dirs snippets=...` (default `snippets`), as pve-storage resolves it."""
    return storage_path(settings, name) / storage(settings, name).subdir(SNIPPETS)


def snippet_path(settings: Settings, volume: str) -> Path:
    """`local:snippets/hook.pl` -> /var/lib/vz/snippets/hook.pl (under the root)."""
    name, _sep, volname = volume.partition(":")
    if not volname.startswith("snippets/") or "/" in volname.removeprefix("snippets/"):
        raise ConfigConflict(f"hookscript {volume!r} is not a snippet volume",
                             "use <storage>:snippets/<file>, as `qm set --hookscript` does")
    return snippets_dir(settings, name) / volname.removeprefix("snippets/")
