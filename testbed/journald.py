"""A real, private systemd-journald for tests and the demo (no pytest).

journald runs in a mount namespace of its own (`unshare --mount --propagation private`)
with tmpfs on /run/systemd, /run/log and /var/log/journal, so its socket and journal
files are invisible to the host and to other test runs. A command run through `run`
(or with `enter()` put in front of its argv) joins that namespace: its
`systemd.journal.send` lands in this journald, and `entries` reads the journal back
with `journalctl -o json` from inside the namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

JOURNALD = "/lib/systemd/systemd-journald"
PRIVATE_MOUNTS = ("/run/systemd", "/run/log", "/var/log/journal")


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class PrivateJournald:
    """One journald in its own mount namespace; `stop()` ends it by PID."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.holder: subprocess.Popen | None = None
        self.journald: subprocess.Popen | None = None

    @property
    def mount_ns(self) -> str:
        """The namespace file another process can join (`nsenter --mount=...`)."""
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/ns/mnt"

    @property
    def socket(self) -> Path:
        """journald's socket as seen from outside the namespace."""
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root/run/systemd/journal/socket")

    def enter(self) -> list[str]:
        """argv prefix that runs a command inside journald's mount namespace."""
        return ["nsenter", f"--mount={self.mount_ns}", "--"]

    def start(self) -> "PrivateJournald":
        # The holder owns the namespace; `unshare` execs `sleep`, so its PID is the holder.
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
        )
        own_ns = os.readlink("/proc/self/ns/mnt")
        _wait_for(
            lambda: os.readlink(self.mount_ns) != own_ns,
            5, "unshare of the journald mount namespace",
        )
        for path in PRIVATE_MOUNTS:
            subprocess.run(self.enter() + ["mount", "-t", "tmpfs", "tmpfs", path], check=True)
        log = open(self.workdir / "journald.log", "wb")
        with log:
            self.journald = subprocess.Popen(
                self.enter() + [JOURNALD], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        _wait_for(self.socket.exists, 10, "journald socket creation")
        return self

    def stop(self) -> None:
        for proc in (self.journald, self.holder):
            if proc is not None:
                _stop(proc)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` inside the namespace (arguments as for subprocess.run)."""
        return subprocess.run(self.enter() + list(argv), **kwargs)

    def read(self, *matches: str) -> list[dict]:
        """Every journal entry matching all `matches` (`FIELD=value`), oldest first."""
        result = self.run(
            ["journalctl", "--no-pager", "-o", "json", *matches],
            capture_output=True, text=True, timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"journalctl failed: {result.stderr.strip()}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def entries(self, *matches: str, count: int = 1, timeout: float = 5.0) -> list[dict]:
        """Like `read`, waiting until at least `count` entries are there.

        journald takes a datagram asynchronously: an entry sent a moment ago may not be
        in the journal file yet.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.read(*matches)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
