"""Read-only observation of the host's networking for the doctor: netlink (pyroute2),
/etc/network/interfaces with what it sources, sysctls, and host facts.

Every file is read under the settings' root (/proc/sys, /proc/meminfo and /sys too), so
a test can point the doctor at a prepared root; netlink is always this network
namespace's. Nothing here decides anything: plan/doctor*.py do.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path, PurePosixPath

from pve_vhost_agent.adapters.host import read_host_memory
from pve_vhost_agent.adapters.linkstate import IFF_UP, over_netlink, port_vlans
from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.formats.dpkgstatus import installed_packages
from pve_vhost_agent.formats.interfaces import SOURCE_DIRECTORY_FILE, ParsedFile, combine, parse_file
from pve_vhost_agent.model.hostnet import (
    BOND_MODES, DOT1AD, DOT1Q, SYSCTLS, XMIT_HASH_POLICIES, BondSlaveState, BondState, BridgeState, HostFacts, HostLink,
    HostNet, NetworkFile, VlanState,
)
from pve_vhost_agent.model.netdevs import ETH_P_8021AD
from pve_vhost_agent.model.ovs import FrozenMap
from pve_vhost_agent.settings import Settings

INTERFACES = "/etc/network/interfaces"
DPKG_STATUS = "/var/lib/dpkg/status"
VSWITCHD_ALTERNATIVE = "/etc/alternatives/ovs-vswitchd"
MAX_FILES = 256  # a `source` loop must not read for ever
BOND_LINK_UP = 0  # IFLA_BOND_SLAVE_MII_STATUS
BOND_STATE_ACTIVE = 0  # IFLA_BOND_SLAVE_STATE


# --- netlink ----------------------------------------------------------------------------


def read_host_net(settings: Settings) -> HostNet:
    """The kernel's links (with bond, VLAN and bridge details and bridge VLAN tables) and sysctls."""
    messages, entries = over_netlink(lambda ipr: (list(ipr.get_links()), port_vlans(ipr)))
    names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in messages}
    vids = {names.get(index): tuple(sorted({entry.vid for entry in found})) for index, found in entries.items()}
    links = tuple(sorted((_link(msg, names, vids) for msg in messages), key=lambda link: link.name))
    return HostNet(links, FrozenMap(read_sysctls(settings)))


def _attrs(nla) -> dict:
    return dict(nla["attrs"]) if nla is not None and hasattr(nla, "get_attr") else {}


def _link(msg, names: dict[int, str], vids: dict[str, tuple[int, ...]]) -> HostLink:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
    data = _attrs(info.get_attr("IFLA_INFO_DATA")) if info else {}
    slave_kind = (info.get_attr("IFLA_INFO_SLAVE_KIND") if info else None) or ""
    slave = _attrs(info.get_attr("IFLA_INFO_SLAVE_DATA")) if info and slave_kind == "bond" else {}
    name = msg.get_attr("IFLA_IFNAME")
    return HostLink(
        name=name,
        index=msg["index"],
        kind=kind,
        mtu=msg.get_attr("IFLA_MTU") or 0,
        up=bool(msg["flags"] & IFF_UP),
        carrier=msg.get_attr("IFLA_CARRIER") != 0,
        master=names.get(msg.get_attr("IFLA_MASTER"), ""),
        lower=names.get(msg.get_attr("IFLA_LINK"), "") if kind == "vlan" else "",
        bond=_bond(data) if kind == "bond" else None,
        bond_slave=BondSlaveState(
            mii_up=slave.get("IFLA_BOND_SLAVE_MII_STATUS") == BOND_LINK_UP,
            active=slave.get("IFLA_BOND_SLAVE_STATE") == BOND_STATE_ACTIVE,
            aggregator=slave.get("IFLA_BOND_SLAVE_AD_AGGREGATOR_ID"),
        ) if slave else None,
        vlan=VlanState(data.get("IFLA_VLAN_ID", 0), DOT1AD if data.get("IFLA_VLAN_PROTOCOL") == ETH_P_8021AD else DOT1Q)
        if kind == "vlan" else None,
        bridge=BridgeState(
            vlan_filtering=bool(data.get("IFLA_BR_VLAN_FILTERING")),
            vlan_protocol=DOT1AD if data.get("IFLA_BR_VLAN_PROTOCOL") == ETH_P_8021AD else DOT1Q,
            stp=bool(data.get("IFLA_BR_STP_STATE")),
            forward_delay=data.get("IFLA_BR_FORWARD_DELAY", 0) / 100,  # clock_t: centiseconds
        ) if kind == "bridge" else None,
        vids=vids.get(name, ()),
    )


def _bond(data: dict) -> BondState:
    mode, policy = data.get("IFLA_BOND_MODE", 0), data.get("IFLA_BOND_XMIT_HASH_POLICY", 0)
    ad = _attrs(data.get("IFLA_BOND_AD_INFO"))
    return BondState(
        mode=BOND_MODES[mode] if mode < len(BOND_MODES) else str(mode),
        miimon=data.get("IFLA_BOND_MIIMON", 0),
        arp_interval=data.get("IFLA_BOND_ARP_INTERVAL", 0),
        xmit_hash_policy=XMIT_HASH_POLICIES[policy] if policy < len(XMIT_HASH_POLICIES) else str(policy),
        aggregator=ad.get("IFLA_BOND_AD_INFO_AGGREGATOR"),
        partner_mac=ad.get("IFLA_BOND_AD_INFO_PARTNER_MAC", ""),
    )


def read_sysctls(settings: Settings) -> dict[str, str]:
    """The sysctls the checks need, from /proc/sys under the root; unreadable ones are left out."""
    values = {}
    for name in SYSCTLS:
        try:
            values[name] = settings.host_path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
        except OSError:
            continue
    return values


# --- /etc/network/interfaces --------------------------------------------------------------


def read_network_file(settings: Settings, path: str = INTERFACES) -> NetworkFile | None:
    """The file and everything it sources (depth first, as ifupdown2 reads them); None when
    the file itself does not exist."""
    if not settings.host_path(path).exists():
        return None
    parsed: list[ParsedFile] = []
    problems: list[str] = []
    seen: set[str] = set()

    def read(host_path: str, where: str) -> None:
        if host_path in seen or len(seen) >= MAX_FILES:
            problems.append(f"{where}: {host_path} is sourced again (a loop?); read once")
            return
        seen.add(host_path)
        try:
            text = settings.host_path(host_path).read_text()
        except (OSError, UnicodeDecodeError) as err:
            problems.append(f"{where}: cannot read {host_path}: {getattr(err, 'strerror', None) or err}")
            return
        parsed.append(parse_file(text, host_path))
        for source in parsed[-1].sources:
            found = _sourced(settings, source.kind, source.pattern, str(PurePosixPath(host_path).parent))
            if not found and not glob.has_magic(source.pattern):
                problems.append(f"{source.where}: {source.kind} {source.pattern}: not found")
            for name in found:
                read(name, source.where)

    read(path, path)
    return combine(parsed, problems)


def _sourced(settings: Settings, kind: str, pattern: str, folder: str) -> list[str]:
    """Host paths a `source`/`source-directory` pattern names (relative to the sourcing
    file's folder), found under the root."""
    absolute = pattern if pattern.startswith("/") else f"{folder}/{pattern}"
    root = str(settings.root).rstrip("/")
    matches = sorted(m[len(root):] or "/" for m in glob.glob(glob.escape(root) + absolute))
    if kind == "source":
        return [m for m in matches if Path(root + m).is_file()]
    files = []
    for match in matches:
        try:
            entries = sorted(os.listdir(root + match))
        except OSError:
            continue
        files += [f"{match.rstrip('/')}/{name}" for name in entries
                  if SOURCE_DIRECTORY_FILE.fullmatch(name) and Path(root + match, name).is_file()]
    return files


# --- host facts ------------------------------------------------------------------------------


def read_host_facts(settings: Settings) -> HostFacts:
    proc = settings.host_path("/proc")
    memory = read_host_memory(proc, settings.host_path("/sys/kernel/mm/hugepages"))
    try:
        meminfo = (proc / "meminfo").read_text()
        total = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
        cpus = sum(1 for line in (proc / "cpuinfo").read_text().splitlines() if line.startswith("processor"))
    except (OSError, ValueError, IndexError) as err:
        raise AgentError(f"cannot read {proc}/meminfo and {proc}/cpuinfo: {err}", "is /proc mounted?") from err
    try:
        packages, known = installed_packages(settings.host_path(DPKG_STATUS).read_text()), True
    except (OSError, UnicodeDecodeError):
        packages, known = frozenset(), False
    try:
        alternative = os.readlink(settings.host_path(VSWITCHD_ALTERNATIVE))
    except OSError:
        alternative = ""
    return HostFacts(cpus=cpus or (os.cpu_count() or 1), mem_total_kib=total, memory=memory, packages=packages,
                     vswitchd_alternative=alternative, packages_known=known)


def file_stamps(settings: Settings, paths: tuple[str, ...]) -> tuple:
    """(path, mtime, size, inode) of each file, for telling cheaply whether any changed."""
    stamps = []
    for path in paths:
        try:
            st = settings.host_path(path).stat()
            stamps.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamps.append((path, None))
    return tuple(stamps)
