"""Loading and changing the cluster-wide spec file /etc/pve/pve-vhost-agent.cfg (an edge).

Every node may change the file, so a change is made under Proxmox's cluster lock
(`cfs_lock` in pve-cluster): creating the folder /etc/pve/priv/lock/<id> succeeds for
exactly one holder in the whole cluster, because pmxcfs serialises mkdir through corosync
and refuses a second mkdir of the same name with EEXIST. A flock would only lock this
node. Removing the folder releases the lock, and pmxcfs expires a lock held longer than
120 s, so a crashed holder cannot block the cluster for ever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import time
from typing import Callable, Iterator

from pve_vhost_agent.adapters import pvefs
from pve_vhost_agent.errors import AgentError, AgentTimeout
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import ClusterSpec
from pve_vhost_agent.formats.specfile import format_spec, parse_spec

# Proxmox retries the lock every 0.1 s at first, then every second.
_FIRST_RETRY, _LAST_RETRY = 0.1, 1.0

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpecUpdate:
    """The spec before and after a change (equal: nothing was written)."""

    before: ClusterSpec
    after: ClusterSpec

    @property
    def changed(self) -> bool:
        return self.before != self.after


def load_spec(settings: Settings) -> ClusterSpec:
    """The declared spec; a missing file is an empty spec."""
    text = pvefs.read_text(settings.spec_file)
    return ClusterSpec() if text is None else parse_spec(text, str(settings.spec_file))


def update_spec(settings: Settings, change: Callable[[ClusterSpec], ClusterSpec]) -> SpecUpdate:
    """Apply `change` to the spec under the cluster lock; write only when it changed."""
    with cluster_lock(settings):
        before = load_spec(settings)  # read under the lock: another node may just have written
        after = change(before)
        update = SpecUpdate(before, after)
        if update.changed:
            pvefs.write_atomic(settings.spec_file, format_spec(after))
        return update


@contextlib.contextmanager
def cluster_lock(settings: Settings) -> Iterator[None]:
    """Hold the agent's cluster-wide lock folder, waiting at most settings.lock_timeout."""
    lock = settings.cluster_lock_dir
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise pvefs.write_error(err, lock.parent) from err
    deadline = time.monotonic() + settings.lock_timeout
    pause = _FIRST_RETRY
    while True:
        try:
            lock.mkdir()
            break
        except FileExistsError:
            if time.monotonic() >= deadline:
                raise AgentTimeout(
                    f"the cluster lock {lock} is still held after {settings.lock_timeout:g} s "
                    "(another node or command is changing the spec)",
                    "retry later; pmxcfs expires a held lock after 120 s",
                ) from None
            _request_unlock(lock)
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _LAST_RETRY)
        except OSError as err:
            raise pvefs.write_error(err, lock) from err
    try:
        yield
    finally:
        try:
            lock.rmdir()
        except FileNotFoundError:
            pass  # pmxcfs expired it already
        except OSError as err:
            # Never hide the error that ended the locked block; pmxcfs expires the lock
            # after 120 s anyway.
            log.warning("could not release the cluster lock %s: %s", lock, err.strerror)


def _request_unlock(lock) -> None:
    # Proxmox's cfs_lock does the same: on pmxcfs, setting a lock folder's times to 0
    # asks pmxcfs to drop the lock if it has expired. Elsewhere it is harmless.
    try:
        os.utime(lock, (0, 0))
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise AgentError(f"cannot touch the cluster lock {lock}: {err.strerror}",
                             "check that /etc/pve is mounted") from err
