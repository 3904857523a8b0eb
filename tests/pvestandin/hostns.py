"""Separate hosts under the same paths: one mount namespace per stand-in node.

On a cluster every node is its own machine: /run, /var/lock, pidfiles, the vhost-user
sockets and the switch are per host, at the same paths on every host. A VM's `args:` line
is cluster-wide and names such paths (the agent's sockets under its root), so nodes that
each use their own folder as root would disagree about the line. A `HostNamespace` is a
mount namespace in which one path, `Cluster.host_root`, is a bind mount of that node's
own folder: every node uses `host_root` as the agent's root and sees its own files there.
The node's QEMU, hooks, agent commands and ovs-vswitchd run inside it (`Node.mount_ns`).
/etc/pve stays cluster-wide: the node folder's `etc/pve` is a relative link to the
shared folder, a sibling of `host_root`.

Paths under the node folders themselves (<base>/<node>/...) are not covered: the test,
the stand-in and the other node still reach them, which is how the migration stream
(an SSH tunnel on Proxmox) gets from the source's QEMU to the target's socket.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

START_TIMEOUT = 10.0


class HostNamespace:
    """A mount namespace showing `folder` at `at`; held open by a `sleep` ended by `stop()`."""

    def __init__(self, folder: Path, at: Path, inside: str | None = None):
        self.folder, self.at = folder, at
        self.inside = inside  # the mount namespace to start from (say a private journald's)
        self.holder: subprocess.Popen | None = None

    @property
    def path(self) -> str:
        """The namespace file to join (`nsenter --mount=...`, `Node.mount_ns`)."""
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/ns/mnt"

    def enter(self) -> list[str]:
        return ["nsenter", f"--mount={self.path}", "--"]

    def start(self) -> "HostNamespace":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.at.mkdir(parents=True, exist_ok=True)
        base = ["nsenter", f"--mount={self.inside}", "--"] if self.inside else []
        # nsenter and unshare exec, so the PID stays; once it is `sleep`, the namespace is made.
        self.holder = subprocess.Popen([*base, "unshare", "--mount", "--propagation", "private", "--",
                                        "sleep", "infinity"], stdin=subprocess.DEVNULL)
        try:
            self._wait_for_sleep()
            subprocess.run([*self.enter(), "mount", "--bind", str(self.folder), str(self.at)],
                           check=True, capture_output=True, timeout=START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_sleep(self) -> None:
        assert self.holder is not None
        comm = Path(f"/proc/{self.holder.pid}/comm")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.holder.poll() is not None:
                raise RuntimeError(f"unshare for {self.folder} exited with {self.holder.returncode}")
            if comm.read_text().strip() == "sleep":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no mount namespace for {self.folder} within {START_TIMEOUT} s")
            time.sleep(0.01)

    def stop(self) -> None:
        """End the holder (by PID). The namespace, and its bind mount, go with its last process."""
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(timeout=10)
