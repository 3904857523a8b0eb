"""Read-only host observations: memory capacity, and links through netlink (pyroute2).

Kernel views (/proc, /sys, netlink) are the host's own; unix sockets are probed by path.
"""

from __future__ import annotations

from pathlib import Path

from pve_vhost_agent.model.host import HostMemory, Link
from pve_vhost_agent.errors import AgentError

HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages")


def read_host_memory(proc: Path = Path("/proc"), hugepages: Path = HUGEPAGES_SYSFS) -> HostMemory:
    available = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1])
    except OSError as err:
        raise AgentError(f"cannot read {proc / 'meminfo'}: {err.strerror}", "is /proc mounted?") from err
    if available is None:
        raise AgentError(f"{proc / 'meminfo'} has no MemAvailable line", "run on Linux 3.14 or later")
    return HostMemory(available, _hugepages_free(hugepages))


def _hugepages_free(sysfs: Path = HUGEPAGES_SYSFS) -> dict[int, int]:
    free: dict[int, int] = {}
    try:
        folders = list(sysfs.iterdir())
    except OSError:
        return free
    for folder in folders:
        # hugepages-2048kB/free_hugepages
        size = folder.name.removeprefix("hugepages-").removesuffix("kB")
        try:
            free[int(size)] = int((folder / "free_hugepages").read_text())
        except (OSError, ValueError):
            continue
    return free



def read_links(netns: str | None = None) -> dict[str, Link]:
    """Every link of the host (or of a named network namespace), by name."""
    from pyroute2 import IPRoute, NetNS  # imported here: only host checks need netlink
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr = NetNS(netns, flags=0) if netns else IPRoute()  # flags=0: never create it
    except (OSError, NetlinkError) as err:
        raise AgentError(f"cannot read the network links through netlink: {err}",
                         "run as root on the host (or in the named network namespace)") from err
    try:
        links = {}
        for msg in ipr.get_links():
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            name = msg.get_attr("IFLA_IFNAME")
            links[name] = Link(
                name=name,
                index=msg["index"],
                mtu=msg.get_attr("IFLA_MTU"),
                kind=kind or "",
                up=bool(msg["flags"] & 1),
                master=msg.get_attr("IFLA_MASTER"),
            )
        return links
    finally:
        ipr.close()


def unix_socket_refusal(path: Path, timeout: float) -> str | None:
    """None when something accepts connections on the unix socket `path`, else why not.

    The connection is closed at once (a vhost-user server sees a client come and go).
    """
    import socket  # here: only the pre-start probe of external sockets needs it

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        return None
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return err.strerror or str(err)
    finally:
        sock.close()
