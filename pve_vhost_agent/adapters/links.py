"""Link ends in a running QEMU, and the cluster facts links are planned on (an edge).

The socket of a link end is the agent's own: a UDP socket bound to this end's address
and port and connected to the peer's, so the kernel hands it datagrams from the peer end
only. QEMU gets it over QMP (`getfd`, then `netdev_add dgram` with `local.type=fd` and a
`hubport` on the end's hub); `-netdev dgram` with addresses would take a datagram from
any sender. No SO_REUSEADDR: while a QEMU holds a port, nobody else can bind it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Iterable

from pve_vhost_agent.adapters import pvefs
from pve_vhost_agent.adapters.qmp import Qmp, QmpError
from pve_vhost_agent.adapters.vmstore import vm_node
from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.formats.corosync import node_addresses
from pve_vhost_agent.formats.qemunet import running_links
from pve_vhost_agent.model import names
from pve_vhost_agent.model.linkactions import ConnectLink, DisconnectLink
from pve_vhost_agent.model.links import LinkFacts, RunningLinks
from pve_vhost_agent.model.names import Address
from pve_vhost_agent.settings import Settings


def observe(settings: Settings, vmid: int) -> RunningLinks:
    """VM `vmid`'s link ends as its QEMU has them (its hubs and their sockets)."""
    with Qmp(settings.qmp_socket(vmid)) as qmp:
        return running_links(qmp.human("info network"))


def apply(settings: Settings, action: ConnectLink | DisconnectLink) -> str:
    """Carry out a link action on the VM's running QEMU; 'done' (raises AgentError)."""
    with Qmp(settings.qmp_socket(action.vmid)) as qmp:
        if isinstance(action, DisconnectLink):
            _delete(qmp, action.netdevs)
            return "done"
        _delete(qmp, action.replaces)  # first: the new socket binds the same port
        index = names.nic_index(action.nic)
        udp, hup = names.link_netdevs(index, action.local, action.remote)
        sock = open_socket(action.local, action.remote)
        try:
            qmp.command("getfd", fds=[sock.fileno()], fdname=udp)
        finally:
            sock.close()  # QEMU holds its own copy now
        try:
            qmp.command("netdev_add", type="dgram", id=udp, local={"type": "fd", "str": udp})
        except AgentError:
            _quietly(qmp, "closefd", fdname=udp)
            raise
        try:
            qmp.command("netdev_add", type="hubport", id=hup, hubid=names.link_hub(index), netdev=udp)
        except AgentError:
            _quietly(qmp, "netdev_del", id=udp)
            raise
    return "done"


def open_socket(local: Address, remote: Address) -> socket.socket:
    """A UDP socket bound to `local` and connected to `remote` (the peer end)."""
    kind = socket.AF_INET6 if ipaddress.ip_address(local[0]).version == 6 else socket.AF_INET
    sock = socket.socket(kind, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(local)
    except OSError as err:
        sock.close()
        where = f"{local[0]} port {local[1]}"
        if err.errno == errno.EADDRINUSE:
            raise AgentError(f"UDP {where} is taken by another socket, so the link end cannot have it",
                             f"find it with `ss -uanp 'sport = :{local[1]}'` and stop it (an old QEMU of the VM, "
                             "or a program using the agent's link ports 20000-29999)") from err
        if err.errno == errno.EADDRNOTAVAIL:
            raise AgentError(f"this node has no address {local[0]}, which corosync.conf gives it",
                             "fix ring0_addr in /etc/pve/corosync.conf, or the node's network") from err
        raise AgentError(f"cannot bind UDP {where}: {err.strerror}", "check the node's network") from err
    try:
        sock.connect(remote)
    except OSError as err:
        sock.close()
        raise AgentError(f"cannot point a UDP socket at {remote[0]} port {remote[1]}: {err.strerror}",
                         "check the route to the peer's node") from err
    return sock


def facts(settings: Settings, peers: Iterable[int]) -> LinkFacts:
    """Where the `peers` are, and the addresses and underlay when one is on another node."""
    nodes = {vmid: vm_node(settings, vmid) for vmid in set(peers)}
    if all(node in (None, settings.node) for node in nodes.values()):
        return LinkFacts(settings.node, nodes)
    addresses = cluster_addresses(settings)
    here = addresses.get(settings.node)
    return LinkFacts(settings.node, nodes, addresses, underlay(here) if here else (None, None))


def cluster_addresses(settings: Settings) -> dict[str, str]:
    """Each node's ring0_addr from corosync.conf, a host name resolved to its address."""
    text = pvefs.read_text(settings.corosync_conf)
    if text is None:
        return {}
    found = {}
    for node, address in node_addresses(text, str(settings.corosync_conf)).items():
        try:
            found[node] = str(ipaddress.ip_address(address))
        except ValueError:
            try:
                found[node] = socket.getaddrinfo(address, None, type=socket.SOCK_DGRAM)[0][4][0]
            except OSError:
                continue  # the planner says that this node has no address
    return found


def underlay(address: str) -> tuple[str | None, int | None]:
    """The interface that holds `address` on this host, and its MTU ((None, None): none)."""
    from pyroute2 import IPRoute  # only a node with links to other nodes needs netlink
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                if msg.get_attr("IFA_ADDRESS") == address or msg.get_attr("IFA_LOCAL") == address:
                    link = ipr.get_links(msg["index"])[0]
                    return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU")
    except (OSError, NetlinkError) as err:
        raise AgentError(f"cannot read this node's addresses through netlink: {err}", "run as root") from err
    return None, None


def _delete(qmp: Qmp, netdevs: Iterable[str]) -> None:
    for ident in netdevs:
        try:
            qmp.command("netdev_del", id=ident)
        except QmpError as err:
            if err.error_class != "DeviceNotFound":
                raise


def _quietly(qmp: Qmp, name: str, **arguments) -> None:
    try:
        qmp.command(name, **arguments)
    except AgentError:
        pass  # undoing after a failure: the first error is the one to report
