"""A running QEMU's QMP socket, /var/run/qemu-server/<vmid>.qmp (an edge).

Proxmox's QEMU serves one QMP client at a time (pvestatd, qm and the API connect for a
moment each), so a session is short: connect, read the greeting (it comes once the
previous client is gone), negotiate, send the few commands, close. Every wait is bounded.
A command may carry file descriptors (SCM_RIGHTS), as `getfd` needs.
"""

from __future__ import annotations

import array
import json
import socket
import time
from pathlib import Path
from typing import Any, Sequence

from pve_vhost_agent.errors import AgentError, AgentTimeout, NotFound

DEFAULT_TIMEOUT = 5.0


class QmpError(AgentError):
    """QEMU answered a command with an error (its class and description are kept)."""

    def __init__(self, problem: str, fix: str | None = None, error_class: str = ""):
        super().__init__(problem, fix)
        self.error_class = error_class


class Qmp:
    """One QMP session: `with Qmp(path) as qmp: qmp.command(...)`."""

    def __init__(self, path: Path, timeout: float = DEFAULT_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> "Qmp":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock = sock
        deadline = time.monotonic() + self.timeout
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            self._message(deadline)  # the greeting, once QEMU serves this client
            self.command("qmp_capabilities")
        except FileNotFoundError as err:
            self.close()
            raise NotFound(f"QEMU's QMP socket {self.path} does not exist", "is the VM running on this node?") from err
        except socket.timeout as err:
            self.close()
            raise AgentTimeout(f"QEMU did not answer on {self.path} within {self.timeout:g} s (another QMP client "
                               "may hold it)", "try again; the service retries every pass") from err
        except OSError as err:
            self.close()
            raise AgentError(f"cannot talk to QEMU on {self.path}: {err.strerror or err}",
                             "is the VM running on this node?") from err
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def command(self, name: str, fds: Sequence[int] = (), **arguments: Any) -> Any:
        """Run `name` and return its result; QmpError with QEMU's description if it fails."""
        assert self._sock is not None, "use Qmp as a context manager"
        data = json.dumps({"execute": name, **({"arguments": arguments} if arguments else {})}).encode() + b"\n"
        deadline = time.monotonic() + self.timeout
        try:
            if fds:
                self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                self._sock.sendall(data)
            while True:
                reply = self._message(deadline)
                if "event" in reply:
                    continue
                if "error" in reply:
                    error = reply["error"]
                    raise QmpError(f"QEMU refused {name} on {self.path}: {error.get('desc', error)}",
                                   "see the VM's QEMU log; this may be a bug: report it",
                                   str(error.get("class", "")))
                return reply.get("return")
        except socket.timeout as err:
            raise AgentTimeout(f"QEMU did not answer {name} on {self.path} within {self.timeout:g} s",
                               "try again") from err
        except OSError as err:
            raise AgentError(f"QMP {name} on {self.path} failed: {err.strerror or err}",
                             "is the VM still running?") from err

    def human(self, command_line: str) -> str:
        """A monitor command's text output (what `qm monitor` shows)."""
        return str(self.command("human-monitor-command", **{"command-line": command_line}))

    def _message(self, deadline: float) -> dict:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self._sock.recv(65536)
            if not chunk:
                raise AgentError(f"QEMU closed its QMP socket {self.path}", "is the VM still running?")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError as err:
            raise AgentError(f"QEMU sent something that is not QMP on {self.path}", "is it QEMU's QMP socket?") from err
