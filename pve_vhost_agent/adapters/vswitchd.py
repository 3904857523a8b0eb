"""ovs-vswitchd's process, read from its pidfile and /proc (model/vswitchd says why).

OVS keeps the pidfile beside the database socket (both in OVS_RUNDIR, /run/openvswitch
on Debian), so the agent's `unix:` remote names it.
"""

from __future__ import annotations

from pathlib import Path

from pve_vhost_agent.model.vswitchd import Activity

PIDFILE = "ovs-vswitchd.pid"


def pidfile_for(remote: str) -> Path | None:
    """unix:/run/openvswitch/db.sock -> /run/openvswitch/ovs-vswitchd.pid (None otherwise)."""
    if not remote.startswith("unix:"):
        return None
    return Path(remote.removeprefix("unix:")).parent / PIDFILE


def activity(pidfile: Path | None) -> Activity | None:
    """The live process the pidfile names and its main thread's CPU time; None when there
    is none (no pidfile, no such process, a zombie)."""
    if pidfile is None:
        return None
    try:
        pid = int(pidfile.read_text(encoding="ascii").strip()[:10])
        stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (OSError, ValueError):
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    if len(fields) < 13 or fields[0] in ("Z", "X"):
        return None
    try:
        return Activity(pid, int(fields[11]) + int(fields[12]))  # utime, stime (fields 14, 15)
    except ValueError:
        return None
