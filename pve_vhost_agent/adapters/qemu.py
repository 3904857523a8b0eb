"""The installed QEMU: its version decides how the agent spells some options."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from pve_vhost_agent.errors import AgentError, AgentTimeout

PROXMOX_KVM = Path("/usr/bin/kvm")  # pve-qemu-kvm's binary on Proxmox
DEBIAN_QEMU = "qemu-system-x86_64"
VERSION_TIMEOUT = 10.0
_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


def default_binary() -> Path:
    """Proxmox's `/usr/bin/kvm`, else `qemu-system-x86_64` from PATH."""
    if PROXMOX_KVM.exists():
        return PROXMOX_KVM
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


def installed_version(binary: Path | str | None = None) -> tuple[int, int, int]:
    """Run `<binary> --version` (default: `default_binary()`) and parse its first line."""
    path = Path(binary) if binary is not None else default_binary()
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
