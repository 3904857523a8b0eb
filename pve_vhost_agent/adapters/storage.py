"""Where a snippet volume (`<storage>:snippets/<file>`) lives on disk: reads /etc/pve/storage.cfg
and resolves it as Proxmox does (formats/storagecfg: the storage's path and content-dirs)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pve_vhost_agent.adapters import pvefs
from pve_vhost_agent.errors import ConfigConflict, NotFound
from pve_vhost_agent.formats.storagecfg import LOCAL, SNIPPETS, Storage, parse_storages
from pve_vhost_agent.settings import Settings


def storage(settings: Settings, name: str) -> Storage:
    cfg = settings.pve_dir / "storage.cfg"
    text = pvefs.read_text(cfg)  # any byte: one that is not UTF-8 stays what it is, as Proxmox reads it
    storages = parse_storages(text) if text is not None else {"local": LOCAL}
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


def runnable_snippet(settings: Settings, volume: str, what: str, fix: str) -> Path:
    """The file of hookscript `volume`, when Proxmox could run it: a regular, executable
    file that starts with `#!` (or is an ELF binary). Else NotFound (missing) or
    ConfigConflict, naming it as `what`, with `fix`."""
    path = snippet_path(settings, volume)
    try:
        info = os.stat(path)
        why = None if stat.S_ISREG(info.st_mode) else "is not a regular file"
        if why is None and not os.access(path, os.X_OK):
            why = "is not executable"
        if why is None:
            with open(path, "rb") as script:
                if not script.read(4).startswith((b"#!", b"\x7fELF")):
                    why = "has no `#!` line"
    except FileNotFoundError:
        raise NotFound(f"{what} {volume} ({path}) is missing", fix) from None
    except OSError as err:
        why = f"cannot be read ({err.strerror})"
    if why is not None:
        raise ConfigConflict(f"{what} {volume} ({path}) {why}, so Proxmox could not run it", fix)
    return path


def snippet_path(settings: Settings, volume: str) -> Path:
    """`local:snippets/hook.pl` -> /var/lib/vz/snippets/hook.pl (under the root)."""
    name, _sep, volname = volume.partition(":")
    if not volname.startswith("snippets/") or "/" in volname.removeprefix("snippets/"):
        raise ConfigConflict(f"hookscript {volume!r} is not a snippet volume",
                             "use <storage>:snippets/<file>, as `qm set --hookscript` does")
    return snippets_dir(settings, name) / volname.removeprefix("snippets/")
