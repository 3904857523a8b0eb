"""Running QEMU for the stand-in: launch (daemonized), talk QMP, wait for the process to end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class QmpError(Exception):
    pass


class Qmp:
    """A minimal QMP client over QEMU's control socket (one command at a time)."""

    def __init__(self, path: Path, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.reader.readline()
            if not line:
                raise QmpError("QMP connection closed")
            message = json.loads(line)
            if "event" not in message:
                return message

    def command(self, name: str, /, **arguments) -> object:
        request = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def qmp_command(socket_path: Path, name: str, /, **arguments) -> object:
    with Qmp(socket_path) as qmp:
        return qmp.command(name, **arguments)


def process_state(pid: int) -> str | None:
    """The state letter from /proc/PID/stat, None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_alive(pid: int) -> bool:
    # Detached daemons are reaped late here: a zombie counts as gone.
    return process_state(pid) not in (None, "Z")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def kill(pid: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Send `sig` to `pid` (ours) and wait until it has ended."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    if not wait_gone(pid, timeout):
        raise TimeoutError(f"process {pid} still runs {timeout} s after signal {sig}")


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def launch(argv: list[str], env: dict[str, str], pidfile: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a `-daemonize` QEMU; returns once it is up (its parent exited) or has failed.

    The daemon writes its pidfile early; if setup blocks (a vhost-user socket nobody
    serves) past `timeout`, the daemon is killed by that PID and TimeoutExpired raised.
    """
    proc = subprocess.Popen(
        argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        daemon = read_pid(pidfile)
        if daemon is not None:
            kill(daemon)
        proc.kill()
        # Bounded: a daemon that had not written its pidfile yet would hold the pipe open.
        out, _ = proc.communicate(timeout=10)
        raise subprocess.TimeoutExpired(argv, timeout, output=out) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")
