"""How the stand-in lays out a Proxmox cluster in a temp folder.

    <base>/pve/                      the cluster-wide /etc/pve (pmxcfs), shared by all nodes
        nodes/<node>/qemu-server/    VM configs, per node
        priv/lock/                   cluster locks
        qemu-server -> nodes/<first node>/qemu-server
    <base>/<node>/                   one root per node: the agent's `--root` on that node
        etc/pve -> ../../pve
        var/lib/vz/snippets/         the `local` storage's snippets (hookscripts)
        var/lock/qemu-server/        VM config locks
        run/qemu-server/             pid, QMP socket, cleanup flag (var/run -> ../run)
        usr/libexec/qemu-server/     the stand-in pve-bridge and pve-bridgedown
        usr/share/qemu-server/       the q35 -readconfig files (from the peer data)

pmxcfs shows `/etc/pve/qemu-server` as a link to the *local* node's folder; one shared
folder cannot do that for several nodes, so the link points at the first node's folder
(correct for a one-node cluster). Code that must work on any node has to use
`nodes/<node>/qemu-server/`, as the agent does.

A node may name a network namespace (`netns`): QEMU (with its taps and the pve-bridge
script) and the hooks run inside it. Give it the namespace of the node's OVS, so taps
land where ovs-vswitchd can open them; two nodes that both run a VM with tap NICs (a
migration) need a namespace each, as two real hosts have. `mount_ns` (a /proc/PID/ns/mnt
path, e.g. a private journald's) is entered the same way.

Nodes that must agree on host paths (a migrated VM's `args:` names its vhost-user
sockets) each get a mount namespace of their own from `host_namespace` (see hostns):
    <base>/host/                     what each node sees there is its own <base>/<node>/
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from pvestandin.hostns import HostNamespace

TESTS_DIR = Path(__file__).resolve().parent.parent

_SCRIPT = """#!/usr/bin/python3
# pve-vhost-agent test stand-in: {name} of node {node} (QEMU runs it for each tap NIC).
import sys
sys.path.insert(0, {tests!r})
from pvestandin.pve_bridge import main
sys.exit(main(sys.argv[1:], root={root!r}, node={node!r}, ovsdb={ovsdb!r}, down={down!r}))
"""


PACKAGE = TESTS_DIR.parent / "pve_vhost_agent"
PACKAGE_FOLDER = "usr/lib/python3/dist-packages"  # where a Debian install puts it, under a root


# pmxcfs serves generated files in /etc/pve whenever it runs (`.version`, `.members`, ...);
# the agent takes a folder without them for pve-cluster being down (adapters/pvefs.py).
PMXCFS_VERSION = '{\n"starttime": 0,\n"clinfo": 0,\n"vmlist": 0,\n"kvstore": {\n}\n}\n'


def mark_pmxcfs(pve: Path) -> None:
    """Make `pve` look served by pmxcfs, as /etc/pve is on a running node."""
    pve.mkdir(parents=True, exist_ok=True)
    (pve / ".version").write_text(PMXCFS_VERSION)
    (pve / ".members").write_text("{\n}\n")


def link_package(root: Path) -> None:
    """The checkout's package where the (isolated) hookscript looks for it under `root`,
    as the installed package is under `/`."""
    folder = root / PACKAGE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / PACKAGE.name).exists():
        (folder / PACKAGE.name).symlink_to(PACKAGE)


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    root: Path
    netns: str | None = None
    ovsdb: str | None = None  # unix:PATH of the node's OVSDB, used by the stand-in pve-bridge
    mount_ns: str | None = None

    def path(self, host_path: str) -> Path:
        """`host_path` (absolute, as on a Proxmox host) on this node."""
        return self.root / host_path.lstrip("/")

    def vm_conf(self, vmid: int, node: str | None = None) -> Path:
        return self.path("/etc/pve/nodes") / (node or self.name) / "qemu-server" / f"{vmid}.conf"

    def enter(self) -> list[str]:
        """argv prefix that runs a command inside the node's namespaces (empty: none)."""
        flags = []
        if self.mount_ns:
            flags.append(f"--mount={self.mount_ns}")
        if self.netns:
            flags.append(f"--net=/run/netns/{self.netns}")
        return ["nsenter", *flags, "--"] if flags else []


class Cluster:
    """Nodes sharing one /etc/pve under `base`."""

    def __init__(self, base: Path, readconfig_dir: Path):
        self.base = base
        self.readconfig_dir = readconfig_dir
        self.pve = base / "pve"
        (self.pve / "priv" / "lock").mkdir(parents=True, exist_ok=True)
        mark_pmxcfs(self.pve)
        (self.pve / "nodes").mkdir(exist_ok=True)
        self.nodes: dict[str, Node] = {}

    @property
    def host_root(self) -> Path:
        """The root path of every node that has a namespace from `host_namespace`."""
        return self.base / "host"

    def host_namespace(self, name: str, inside: str | None = None) -> HostNamespace:
        """Start node `name`'s own mount namespace, in which `host_root` shows `<base>/<name>`.

        Made before `add_node(name, mount_ns=<its path>)`, so the node's ovs-vswitchd can be
        started inside it first; the caller stops it. `inside`: the namespace to start from.
        """
        return HostNamespace(self.base / name, self.host_root, inside).start()

    def add_node(self, name: str, *, netns: str | None = None, ovsdb: str | None = None,
                 mount_ns: str | None = None) -> Node:
        node = Node(name, self.base / name, netns, ovsdb, mount_ns)
        (self.pve / "nodes" / name / "qemu-server").mkdir(parents=True, exist_ok=True)
        if not self.nodes:
            (self.pve / "qemu-server").symlink_to(f"nodes/{name}/qemu-server")
            (self.pve / "local").symlink_to(f"nodes/{name}")
        (node.root / "etc").mkdir(parents=True)
        (node.root / "etc" / "pve").symlink_to("../../pve")
        for folder in ("/var/lib/vz/snippets", "/var/lock/qemu-server", "/run/qemu-server",
                       "/usr/libexec/qemu-server", "/usr/share/qemu-server"):
            node.path(folder).mkdir(parents=True, exist_ok=True)
        node.path("/var/run").symlink_to("../run")
        link_package(node.root)
        for script, down in (("pve-bridge", False), ("pve-bridgedown", True)):
            path = node.path(f"/usr/libexec/qemu-server/{script}")
            path.write_text(_SCRIPT.format(name=script, node=name, tests=str(TESTS_DIR),
                                           root=str(node.root), ovsdb=ovsdb, down=down))
            path.chmod(0o755)
        for cfg in self.readconfig_dir.glob("*.cfg"):
            shutil.copy(cfg, node.path("/usr/share/qemu-server") / cfg.name)
        self.nodes[name] = node
        return node

    def write_vm_config(self, node: str, vmid: int, text: str) -> Path:
        path = self.pve / "nodes" / node / "qemu-server" / f"{vmid}.conf"
        path.write_text(text)
        return path

    def install_hookscript(self, source: Path, name: str | None = None, mode: int = 0o755) -> str:
        """Copy `source` into every node's local snippets folder; returns its volume id."""
        name = name or source.name
        for node in self.nodes.values():
            target = node.path("/var/lib/vz/snippets") / name
            shutil.copy(source, target)
            target.chmod(mode)
        return f"local:snippets/{name}"
