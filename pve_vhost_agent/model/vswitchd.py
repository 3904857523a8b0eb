"""Whether a wait for ovs-vswitchd should go on. Pure.

ovs-vswitchd applies a change by reconfiguring, and with thousands of ports on a loaded
host one reconfiguration takes tens of seconds (bench/run: about 30 s at 4,000 ports on
2 busy cores, a boot storm queueing several), during which it answers nothing, not even
ovs-appctl. What tells a busy ovs-vswitchd from a dead or stuck one is its process: alive,
and its main thread (the one that reconfigures) using CPU. A wait goes on in windows
while that holds, up to a limit; it ends at once on a dead one and after one window on
a stuck one.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Activity:
    """How busy ovs-vswitchd's main thread has been."""

    pid: int
    cpu_ticks: int  # user + system time of its main thread, in clock ticks


def verdict(before: Activity | None, now: Activity | None, waited: float, limit: float, pidfile: str) -> str | None:
    """None to wait one more window; else why the wait ends (said after "ovs-vswitchd did
    not apply ... within N s"). `before` is the sample at the window's start."""
    if now is None:
        return f"ovs-vswitchd is not running (no live process in {pidfile})"
    if waited >= limit:
        return (f"ovs-vswitchd (pid {now.pid}) kept working but a start waits at most {limit:g} s "
                "(ovs_busy_timeout)")
    if before is None or before.pid != now.pid:
        return None  # it (re)started: a new ovs-vswitchd applies the whole database first
    if now.cpu_ticks > before.cpu_ticks:
        return None
    return f"ovs-vswitchd (pid {now.pid}) used no CPU meanwhile: it looks stuck"
