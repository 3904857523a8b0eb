"""The installed QEMU: its version decides how the agent spells some options."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pve_vhost_agent.adapters import sockets
from pve_vhost_agent.errors import AgentError, AgentTimeout

PROXMOX_KVM = Path("/usr/bin/kvm")  # pve-qemu-kvm's binary on Proxmox
DEBIAN_QEMU = "qemu-system-x86_64"
VERSION_TIMEOUT = 10.0
CACHE_NAME = "qemu-version"  # in the agent's run folder
_VERSION = re.compile(r"QEMU emulator version ([0-9]{1,4})\.([0-9]{1,4})(?:\.([0-9]{1,4}))?")


def default_binary() -> Path:
    """Proxmox's `/usr/bin/kvm`, else `qemu-system-x86_64` from PATH."""
    if PROXMOX_KVM.exists():
        return PROXMOX_KVM
    import shutil  # off Proxmox only: a hook on a node never needs it

    found = shutil.which(DEBIAN_QEMU)
    if not found:
        raise AgentError(
            f"no QEMU found: neither {PROXMOX_KVM} nor {DEBIAN_QEMU} on PATH",
            "install pve-qemu-kvm (Proxmox) or qemu-system-x86",
        )
    return Path(found)


def parse_version(text: str) -> tuple[int, int, int]:
    """`QEMU emulator version 9.2.0 (pve-qemu-kvm_9.2.0-5)` -> (9, 2, 0)."""
    match = _VERSION.search(text)
    if not match:
        first = text.strip().splitlines()[0] if text.strip() else "nothing"
        raise AgentError(
            f"cannot read a QEMU version from {first!r}",
            "check that the QEMU binary works: run it with --version",
        )
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def installed_version(binary: Path | str | None = None, cache_dir: Path | None = None,
                      remember: bool = True) -> tuple[int, int, int]:
    """The version `<binary> --version` (default: `default_binary()`) prints.

    With `cache_dir` (the agent's root-owned run folder) the answer is kept there, keyed by
    the binary's identity (path, device, inode, size, mtime): an upgrade replaces the file
    and so asks again, and no hook pays for starting QEMU twice. `remember=False` reads
    the cache but writes nothing (a dry run).
    """
    path = Path(binary) if binary is not None else default_binary()
    identity = _identity(path)
    cache = cache_dir / CACHE_NAME if cache_dir is not None and identity else None
    if cache is not None and not sockets.folder_problem(cache_dir):
        try:
            key, _, version = cache.read_text().partition("\n")
            if key == identity:
                return parse_version(version)
        except (OSError, ValueError, AgentError):
            pass  # missing or mangled (not even UTF-8): ask QEMU
    version = _ask(path)
    if cache is not None and remember:
        _remember(cache, identity, version)
    return version


def _identity(path: Path) -> str:
    try:
        real = path.resolve()
        info = real.stat()
    except OSError:
        return ""
    return f"{real} {info.st_dev} {info.st_ino} {info.st_size} {info.st_mtime_ns}"


def _remember(cache: Path, identity: str, version: tuple[int, int, int]) -> None:
    """Best effort: a cache that cannot be written only costs the next call a QEMU start."""
    try:
        sockets.make_folder(cache.parent)
        tmp = cache.with_name(f"{cache.name}.tmp.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as out:
            out.write(f"{identity}\nQEMU emulator version {'.'.join(map(str, version))}\n")
        os.replace(tmp, cache)
    except (OSError, AgentError):
        pass


def _ask(path: Path) -> tuple[int, int, int]:
    import subprocess  # only when the cached version does not fit: most hooks never start QEMU

    try:
        result = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT, check=False
        )
    except FileNotFoundError as err:
        raise AgentError(f"QEMU binary {path} does not exist", "install pve-qemu-kvm (Proxmox) or qemu-system-x86") from err
    except subprocess.TimeoutExpired as err:
        raise AgentTimeout(f"{path} --version did not answer within {VERSION_TIMEOUT:g} s", "check the QEMU install") from err
    except OSError as err:
        raise AgentError(f"QEMU binary {path} cannot be run ({err.strerror})", "check that it is QEMU's executable") from err
    if result.returncode != 0:
        raise AgentError(
            f"{path} --version failed with exit code {result.returncode}: {result.stderr.strip()[:200]}",
            "check the QEMU install",
        )
    return parse_version(result.stdout)
