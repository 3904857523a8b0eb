"""The agent's configuration: one frozen value built at the entry point and passed down.

Every host path is taken under `root`, so tests (and the demo) run the real code
against a temporary folder. There is no other test switch.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path

from pve_vhost_agent.errors import UsageError

from pve_vhost_agent.model.spec import Backend

DEFAULT_OVSDB = "unix:/var/run/openvswitch/db.sock"
SPEC_DIR_NAME = "pve-vhost-agent"
LEGACY_SPEC_FILE_NAME = "pve-vhost-agent.cfg"
# The settings a command (and the hookscript) takes from its environment, and nothing else.
ENV_ROOT, ENV_OVSDB, ENV_NODE = "PVE_VHOST_AGENT_ROOT", "PVE_VHOST_AGENT_OVSDB", "PVE_VHOST_AGENT_NODE"
# A Proxmox node name is a host name label (pve-cluster refuses others).
_NODE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+-]*")


def local_node_name() -> str:
    """Proxmox names a node after the short host name."""
    return socket.gethostname().split(".", 1)[0]


def check_node(name: str, what: str = "node name") -> str:
    """A node name safe to put in a path (never `..` or `/`)."""
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
        raise UsageError(f"{what} {name[:64]!r} is not a Proxmox node name",
                         "give the node's short host name: letters, digits and inner dashes")
    return name


def check_ovsdb(remote: str) -> str:
    """Only `unix:PATH`: the agent talks to the local Open vSwitch (no ssl:, no tcp:)."""
    path = remote.removeprefix("unix:") if isinstance(remote, str) else ""
    if not remote.startswith("unix:") or not _SAFE_PATH.fullmatch(path) or "/../" in f"{path}/":
        raise UsageError(f"OVSDB remote {remote[:80]!r} is not unix:/absolute/path",
                         f"give --ovsdb unix:PATH, e.g. {DEFAULT_OVSDB}")
    return remote


@dataclasses.dataclass(frozen=True)
class Settings:
    """The agent's configuration, built once at the entry point and passed down."""

    root: Path = Path("/")
    ovsdb: str = DEFAULT_OVSDB
    node: str = dataclasses.field(default_factory=local_node_name)
    # Proxmox waits 10 s for a VM config lock and for the cluster lock.
    lock_timeout: float = 10.0
    # Bound for OVSDB connects, transactions and ovs-vswitchd applying a change. Proxmox
    # puts no limit on a hook; a loaded host (bench/run: a boot storm on a switch of
    # thousands of ports) needs some seconds, and a remote migration allows its target
    # start 40 s at least (qemu-server config_aware_timeout + 10).
    ovs_timeout: float = 30.0
    # A wait for ovs-vswitchd goes on past ovs_timeout while its process keeps working,
    # up to this (Proxmox's own bound for resuming a VM; model/vswitchd).
    ovs_busy_timeout: float = 300.0

    @classmethod
    def checked(cls, root: str | Path | None, ovsdb: str | None, node: str | None) -> "Settings":
        """Settings from the command line or the environment, each value checked (UsageError)."""
        root_path = Path(root or "/")
        if not root_path.is_absolute() or ".." in root_path.parts:
            raise UsageError(f"root folder {str(root)[:80]!r} is not an absolute path", "give --root /absolute/folder")
        return cls(root=root_path, ovsdb=check_ovsdb(ovsdb or DEFAULT_OVSDB),
                   node=check_node(node) if node else check_node(local_node_name(), "this host's name"))

    def host_path(self, path: str) -> Path:
        """`path` (absolute, as on a Proxmox host) under the configured root."""
        return self.root / path.lstrip("/")

    @property
    def pve_dir(self) -> Path:
        return self.host_path("/etc/pve")

    @property
    def spec_dir(self) -> Path:
        """One declarations file per VM (see adapters/specstore)."""
        return self.pve_dir / SPEC_DIR_NAME

    def vm_spec_file(self, vmid: int) -> Path:
        return self.spec_dir / f"{vmid}.cfg"

    @property
    def legacy_spec_file(self) -> Path:
        """The single spec file of versions before 0.2, split into per-VM files."""
        return self.pve_dir / LEGACY_SPEC_FILE_NAME

    @property
    def cluster_lock_dir(self) -> Path:
        return self.pve_dir / "priv" / "lock" / "pve-vhost-agent"

    def nodes_dir(self) -> Path:
        return self.pve_dir / "nodes"

    def vm_conf(self, vmid: int, node: str | None = None) -> Path:
        return self.nodes_dir() / (node or self.node) / "qemu-server" / f"{vmid}.conf"

    def vm_lock(self, vmid: int) -> Path:
        return self.host_path("/var/lock/qemu-server") / f"lock-{vmid}.conf"

    def qemu_pidfile(self, vmid: int) -> Path:
        return self.host_path("/var/run/qemu-server") / f"{vmid}.pid"

    def qmp_socket(self, vmid: int) -> Path:
        """Proxmox's QMP socket of a running VM."""
        return self.host_path("/var/run/qemu-server") / f"{vmid}.qmp"

    @property
    def corosync_conf(self) -> Path:
        """The cluster's node list, with each node's address (links between nodes use it)."""
        return self.pve_dir / "corosync.conf"

    @property
    def run_dir(self) -> Path:
        return self.host_path("/run/pve-vhost-agent")

    def socket_dir(self, backend: str) -> Path:
        """One folder per backend: `ovs` (QEMU listens) and `external` (QEMU connects)."""
        return self.run_dir / backend

    def socket_dirs(self) -> dict[Backend, Path]:
        return {backend: self.socket_dir(backend.value) for backend in Backend}

    def snippets_dir(self) -> Path:
        """The `snippets/` folder of the `local` storage."""
        return self.host_path("/var/lib/vz/snippets")
