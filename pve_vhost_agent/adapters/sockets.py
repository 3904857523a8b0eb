"""The agent's socket folders under /run/pve-vhost-agent and the socket files in them.

QEMU runs as root and connects to (or serves) the sockets in these folders with the
guest's memory: a folder another user may write to would let that user plant a socket.
So the agent makes them root's, mode 0755, whatever the caller's umask, and reports one
that is a symlink, not root's or writable by others (`folder_problem`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pve_vhost_agent.errors import AgentError, ConfigConflict
from pve_vhost_agent.model.host import Folder
from pve_vhost_agent.model.names import socket_vmid

FOLDER_MODE = 0o755


def folder_problem(path: Path) -> str | None:
    """Why `path` (and each of the agent's folders above it, up to /run) cannot be trusted
    with sockets; None if fine or missing (then it is made)."""
    for folder in (path, *path.parents):
        if folder != path and folder.name in ("run", ""):
            break  # the system's own folders above the agent's
        try:
            info = os.lstat(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue  # made by the agent, or refused below when a parent is no folder
        except OSError as err:
            return f"cannot inspect {folder}: {err.strerror}"
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            return f"{folder} is not a plain folder"
        if info.st_uid != os.geteuid():
            return f"{folder} belongs to uid {info.st_uid}, not to root"
        if info.st_mode & 0o022:
            return f"{folder} is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def folder(path: Path) -> Folder:
    """`path` as found (for a plan to decide on)."""
    return Folder(str(path), path.is_dir(), folder_problem(path) or "")


def check_folder(path: Path) -> None:
    """ConfigConflict when `path` cannot be trusted with sockets (see `folder_problem`)."""
    problem = folder_problem(path)
    if problem:
        raise ConfigConflict(f"refusing the socket folder {path}: {problem}",
                             "make it a folder of root's with mode 0755, or remove it and let the agent make it")


def make_folder(path: Path) -> bool:
    """Create `path` and its missing parents, mode 0755; True when something was made."""
    check_folder(path)
    return create_folders(path, "socket folder")


def create_folders(path: Path, what: str) -> bool:
    """Create `path` and its missing parents, mode 0755 whatever the umask (`what` names it
    in an error); True when something was made."""
    made = False
    for folder in reversed((path, *path.parents)):
        if folder.exists():
            continue
        try:
            folder.mkdir(mode=FOLDER_MODE)
            os.chmod(folder, FOLDER_MODE)  # mkdir's mode is masked by the umask
        except FileExistsError:
            continue  # a concurrent start made it
        except OSError as err:
            raise AgentError(f"cannot create the {what} {folder}: {err.strerror}",
                             f"make {folder} a folder root can write to") from err
        made = True
    return made


def vm_sockets(folder: Path, vmid: int | None = None) -> list[Path]:
    """The socket files named like the agent's (of VM `vmid`, or of any VM) in `folder`."""
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return []
    except OSError as err:
        raise AgentError(f"cannot list {folder}: {err.strerror}", "run the agent as root") from err
    found = [p for p in entries if socket_vmid(p.name) is not None and (vmid is None or socket_vmid(p.name) == vmid)]
    return sorted(p for p in found if p.is_socket())


def remove_socket(path: Path) -> str:
    """Remove a socket file QEMU left; 'removed', or 'gone' when it was not there."""
    if not path.is_socket():
        return "gone"
    try:
        path.unlink()
    except FileNotFoundError:
        return "gone"
    except OSError as err:
        raise AgentError(f"cannot remove the stale socket {path}: {err.strerror}",
                         "remove it by hand before the VM's next start") from err
    return "removed"
