"""An exclusive flock on a file, waited for a bounded time: Proxmox's VM locks, the agent's netdev lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from pve_vhost_agent.errors import AgentError

POLL = 0.05  # seconds between flock attempts


@contextlib.contextmanager
def flocked(path: Path, timeout: float, busy: Callable[[], AgentError], what: str = "lock file") -> Iterator[None]:
    """Hold an exclusive flock on `path` (made when missing), waiting at most `timeout`
    seconds; raise `busy()` when it stays held. Closing the descriptor releases it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise AgentError(f"cannot open the {what} {path}: {err.strerror}", "run the agent as root") from err
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy() from None
                time.sleep(POLL)
        yield
    finally:
        os.close(fd)
