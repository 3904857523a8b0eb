"""Reading and atomically replacing files on pmxcfs (/etc/pve).

pmxcfs refuses chmod and chown (a file's mode comes from its path) but renames within a
folder atomically, so a write is: temp file beside the target, fsync, rename. Without
quorum the cluster file system refuses writes; that is reported as ClusterReadOnly.

Whether pmxcfs serves /etc/pve at all is told by what it always shows (pve-cluster
src/pmxcfs/pmxcfs.c, `create_symlinks`: the generated files `.version`, `.members`,
`.vmlist`, ... exist whenever pmxcfs is mounted, whatever the cluster holds). When
pve-cluster is down, /etc/pve is the bare mount point: an empty folder, in which every
VM and declaration would look absent. Without quorum pmxcfs shows its folders with mode
0555 instead of 0755 (src/pmxcfs/cfs-plug-memdb.c, `tree_entry_stat`), and refuses writes.
Text is decoded with `surrogateescape` so that any byte a file holds is written back
unchanged. A file larger than pmxcfs holds (1 MiB) cannot be a real one: it is refused
before it is parsed, and so is anything but a regular file (a FIFO would block a read).

A writer killed between its temp file and the rename leaves `<file>.tmp.<pid>` behind,
which pmxcfs would replicate to every node: the next writer of that file, holding the
lock that every writer of it holds, removes those whose process is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

from pve_vhost_agent.errors import AgentError, ClusterFsDown, ClusterReadOnly, ConfigConflict
from pve_vhost_agent.model.host import CLUSTER_FS_NOT_MOUNTED, CLUSTER_FS_OK, CLUSTER_FS_READ_ONLY

MAX_FILE_SIZE = 1024 * 1024  # pmxcfs refuses larger files
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_TEMP_FILE = re.compile(r"(?P<target>.+)\.tmp\.(?P<pid>[0-9]{1,10})")
PMXCFS_MARK = ".version"  # a file pmxcfs generates; absent from the bare mount point
MOUNTED, NOT_MOUNTED, READ_ONLY = CLUSTER_FS_OK, CLUSTER_FS_NOT_MOUNTED, CLUSTER_FS_READ_ONLY
CLUSTER_FIX = "systemctl status pve-cluster"

log = logging.getLogger(__name__)


def cluster_fs(pve_dir: Path) -> str:
    """MOUNTED, NOT_MOUNTED (pmxcfs is not running) or READ_ONLY (no quorum)."""
    if not (pve_dir / PMXCFS_MARK).exists():
        return NOT_MOUNTED
    try:
        mode = (pve_dir / "nodes").stat().st_mode
    except OSError:
        return MOUNTED  # a node folder not made yet: nothing says read-only
    return MOUNTED if mode & 0o200 else READ_ONLY


def cluster_fs_error(pve_dir: Path) -> AgentError | None:
    """What is wrong with /etc/pve as an error (None when pmxcfs serves it with quorum)."""
    state = cluster_fs(pve_dir)
    if state == NOT_MOUNTED:
        return ClusterFsDown(f"{pve_dir} is not mounted (no {PMXCFS_MARK}): the cluster file system pmxcfs is not "
                             "running, so no VM config nor declaration can be read", CLUSTER_FIX)
    if state == READ_ONLY:
        return ClusterReadOnly(f"{pve_dir} is read-only: this node has no quorum, so no VM config nor declaration "
                               "can be changed", f"restore quorum (see `pvecm status`; {CLUSTER_FIX})")
    return None


def require_mounted(pve_dir: Path) -> None:
    """Raise ClusterFsDown unless pmxcfs serves `pve_dir` (read-only is fine for reading)."""
    err = cluster_fs_error(pve_dir)
    if isinstance(err, ClusterFsDown):
        raise err


def read_text(path: Path) -> str | None:
    """The file's text, or None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _read_error(err, path) from err
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise _read_error(IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)), path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigConflict(f"{path} is not a regular file", "replace it with the file Proxmox keeps there, or remove it")
        data = _read_at_most(fd, MAX_FILE_SIZE + 1)
    except OSError as err:
        raise _read_error(err, path) from err
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:
        raise ConfigConflict(f"{path} is {max(info.st_size, len(data))} bytes, over pmxcfs's 1 MiB limit for a file "
                             "in /etc/pve", "shorten it (no Proxmox node can hold it): remove what is no longer needed")
    return data.decode("utf-8", "surrogateescape")


def _read_at_most(fd: int, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_error(err: OSError, path: Path) -> AgentError:
    return AgentError(f"cannot read {path}: {err.strerror}", "check that /etc/pve is mounted and readable")


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


def check_size(path: Path, text: str) -> bytes:
    """`text` as the bytes a write of `path` would hold; ConfigConflict when pmxcfs would refuse them."""
    data = text.encode("utf-8", "surrogateescape")
    if len(data) > MAX_FILE_SIZE:
        raise ConfigConflict(f"{path} would be {len(data)} bytes, over pmxcfs's 1 MiB limit",
                             "remove what is no longer needed from it (a long description or args line)")
    return data


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: a reader sees the old or the new file, never a mix."""
    data = check_size(path, text)
    _not_a_link(path)
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


def remove(path: Path) -> None:
    """Remove `path` (nothing to do when it is gone); never a symbolic link."""
    _not_a_link(path)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise write_error(err, path) from err


def remove_stale_temp_files(folder: Path, target: str | None = None) -> list[Path]:
    """Remove the `<file>.tmp.<pid>` files in `folder` (of `<target>` only, when given)
    whose process no longer runs on this node; the ones removed. Call it holding the lock
    every writer of those files holds: then no live writer of this node or another is
    between its temp file and its rename (a process alive here with that pid, perhaps of
    another node's writer, keeps its file)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise _read_error(err, folder) from err
    removed = []
    for name in sorted(names):
        match = _TEMP_FILE.fullmatch(name)
        if not match or (target is not None and match["target"] != target) or _process_alive(int(match["pid"])):
            continue
        path = folder / name
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise write_error(err, path) from err
        log.info("removed %s, left by process %s that ended before renaming it", path, match["pid"])
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    """A process (not a zombie) with this pid runs on this node."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def _not_a_link(path: Path) -> None:
    # A rename or unlink would replace the link itself and leave what it points to stale.
    if path.is_symlink():
        raise ConfigConflict(f"{path} is a symbolic link, which the agent does not replace",
                             "replace it with a copy of the file it points to (or remove it), then run the command again")


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
