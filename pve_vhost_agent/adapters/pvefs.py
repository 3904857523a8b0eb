"""Reading and atomically replacing files on pmxcfs (/etc/pve).

pmxcfs refuses chmod and chown (a file's mode comes from its path) but renames within a
folder atomically, so a write is: temp file beside the target, fsync, rename. Without
quorum the cluster file system refuses writes; that is reported as ClusterReadOnly.
Text is decoded with `surrogateescape` so that any byte a file holds is written back
unchanged.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Callable

from pve_vhost_agent.errors import AgentError, ClusterReadOnly

MAX_FILE_SIZE = 1024 * 1024  # pmxcfs refuses larger files
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def read_text(path: Path) -> str | None:
    """The file's text, or None when it does not exist."""
    try:
        return path.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise AgentError(f"cannot read {path}: {err.strerror}", "check that /etc/pve is mounted and readable") from err


class ParsedFiles:
    """Parsed files kept while they are unchanged (same inode, size and mtime): the service
    reads hundreds of VM configs and spec files every pass, and almost none has changed."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple[int, int, int], Any]] = {}

    def get(self, path: Path, parse: Callable[[str], Any]) -> Any:
        """`parse` of the file's text (None when it does not exist); its errors propagate."""
        try:
            info = path.stat()
        except FileNotFoundError:
            self._known.pop(path, None)
            return None
        except OSError as err:
            raise AgentError(f"cannot read {path}: {err.strerror}", "check that /etc/pve is mounted and readable") from err
        key = (info.st_ino, info.st_size, info.st_mtime_ns)
        known = self._known.get(path)
        if known is not None and known[0] == key:
            return known[1]
        text = read_text(path)
        value = None if text is None else parse(text)
        self._known[path] = (key, value)
        return value

    def forget_others(self, paths: set[Path]) -> None:
        for gone in set(self._known) - paths:
            del self._known[gone]


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: a reader sees the old or the new file, never a mix."""
    data = text.encode("utf-8", "surrogateescape")
    if len(data) > MAX_FILE_SIZE:
        raise AgentError(f"{path} would be {len(data)} bytes, over pmxcfs's 1 MiB limit",
                         "remove entries that are no longer needed")
    # The name Proxmox's own writers use (`<file>.tmp.<pid>`): pmxcfs accepts it anywhere.
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        raise write_error(err, path) from err


def write_error(err: OSError, path: Path) -> AgentError:
    """The agent's error for a failed write of `path` on /etc/pve."""
    if err.errno in _READ_ONLY:
        return ClusterReadOnly(
            f"/etc/pve is read-only: this node has no quorum (writing {path} failed: {err.strerror})",
            "restore quorum (see `pvecm status`), then run the command again",
        )
    return AgentError(f"cannot write {path}: {err.strerror}", "check that /etc/pve is mounted and has space")


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # never created, or the file system is read-only: the write error says enough
