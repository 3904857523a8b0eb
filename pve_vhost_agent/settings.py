"""The agent's configuration: one frozen value built at the entry point and passed down.

Every host path is taken under `root`, so tests (and the demo) run the real code
against a temporary folder. There is no other test switch.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

from pve_vhost_agent.model.spec import Backend

DEFAULT_OVSDB = "unix:/var/run/openvswitch/db.sock"
SPEC_FILE_NAME = "pve-vhost-agent.cfg"


def local_node_name() -> str:
    """Proxmox names a node after the short host name."""
    return socket.gethostname().split(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class Settings:
    root: Path = Path("/")
    ovsdb: str = DEFAULT_OVSDB
    node: str = dataclasses.field(default_factory=local_node_name)
    # Proxmox waits 10 s for a VM config lock and for the cluster lock.
    lock_timeout: float = 10.0
    # Bound for OVSDB connects, transactions and ovs-vswitchd applying a change.
    ovs_timeout: float = 10.0

    def host_path(self, path: str) -> Path:
        """`path` (absolute, as on a Proxmox host) under the configured root."""
        return self.root / path.lstrip("/")

    @property
    def pve_dir(self) -> Path:
        return self.host_path("/etc/pve")

    @property
    def spec_file(self) -> Path:
        return self.pve_dir / SPEC_FILE_NAME

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
