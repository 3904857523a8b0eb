"""Hookscripts as pve-guest-common `exec_hookscript` runs them, and the task log they write to.

The script named by the VM config's `hookscript: <storage>:snippets/<file>` is resolved
at every call (it must be a regular, executable file in the storage's snippets folder),
then run directly as `<script> <vmid> <phase>`: no shell, stdin an empty pipe, the
caller's environment plus `LC_ALL=C` (and `LVM_SUPPRESS_FD_WARNINGS=1`, as
`PVE::Tools::run_command` adds), no timeout unless the test sets one. Its stdout and
stderr go to the task log. Only `local` (a dir storage at /var/lib/vz) is modelled.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

STORAGE_PATHS = {"local": "/var/lib/vz"}


class HookError(Exception):
    """A hookscript could not be resolved, or exited non-zero (message as Proxmox prints it)."""


@dataclasses.dataclass(frozen=True)
class HookRun:
    phase: str
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@dataclasses.dataclass
class TaskLog:
    """What Proxmox shows as a task's log: hook output, QEMU output, its own messages."""

    lines: list[str] = dataclasses.field(default_factory=list)
    hooks: list[HookRun] = dataclasses.field(default_factory=list)

    def add(self, text: str) -> None:
        self.lines += [line for line in text.splitlines() if line != ""]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def phases(self) -> list[str]:
        return [run.phase for run in self.hooks]


def resolve_hookscript(root: Path, volid: str) -> Path:
    """`check_hookscript`: the path of `volid`, which must be an executable snippet."""
    storage, _, volname = volid.partition(":")
    if storage not in STORAGE_PATHS:
        raise HookError(f"storage '{storage}' does not exist")
    if not volname.startswith("snippets/") or "/" in volname.removeprefix("snippets/"):
        raise HookError(f"'{volid}' is not in the snippets directory")
    path = root / STORAGE_PATHS[storage].lstrip("/") / volname
    if not path.is_file():
        raise HookError(f"script '{volid}' does not exist")
    if not os.access(path, os.X_OK):
        raise HookError(f"script '{volid}' is not executable")
    return path


def start_environment(base: Mapping[str, str], migrated_from: str | None) -> dict[str, str]:
    """`vm_start_nolock` sets PVE_MIGRATED_FROM (empty on a normal start) for the hooks and
    for QEMU with its network scripts."""
    return {**base, "PVE_MIGRATED_FROM": migrated_from or ""}


def run_command_env(env: Mapping[str, str]) -> dict[str, str]:
    """What `PVE::Tools::run_command` adds to the environment of every command it runs."""
    return {**env, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}


def exec_hookscript(
    *,
    root: Path,
    conf: Mapping[str, str],
    vmid: int,
    phase: str,
    env: Mapping[str, str],
    task: TaskLog,
    stop_on_error: bool = False,
    enter: Sequence[str] = (),
    timeout: float | None = None,
) -> HookRun | None:
    """Run the VM's hookscript for `phase`; a failure raises only with `stop_on_error`."""
    volid = conf.get("hookscript")
    if not volid:
        return None
    run = None
    try:
        path = resolve_hookscript(root, volid)
        argv = (str(path), str(vmid), phase)
        # input=b"" gives the script a pipe that is closed at once: an empty stdin.
        result = subprocess.run(
            [*enter, *argv], input=b"", capture_output=True, env=run_command_env(env), cwd="/", timeout=timeout
        )
        run = HookRun(phase, argv, result.returncode,
                      result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))
        task.hooks.append(run)
        task.add(run.stdout)
        task.add(run.stderr)
        if result.returncode != 0:
            raise HookError(f"command '{' '.join(argv)}' failed: exit code {result.returncode}")
    except HookError as err:
        message = f"hookscript error for {vmid} on {phase}: {err}"
        task.add(message)
        if stop_on_error:
            raise HookError(message) from err
    return run
