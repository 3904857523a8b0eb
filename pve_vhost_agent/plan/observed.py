"""What the service observed of this node, as values: its VMs, locks, OVS, QEMU, problems.

Values only (flows/observe.py reads them, plan/node.py decides on them). A part that
could not be read is None, and a Problem says why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from pve_vhost_agent.errors import AgentError, ExitCode
from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig
from pve_vhost_agent.model.host import CLUSTER_FS_OK
from pve_vhost_agent.model.links import LinkFacts, RunningLinks
from pve_vhost_agent.model.netdevs import LinkState
from pve_vhost_agent.model.names import is_agent_hook
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.model.spec import Backend, ClusterSpec


OVSDB_PROBLEM, CLUSTER_FS_PROBLEM = "ovsdb", "pmxcfs"  # problems that keep their identity while their words change


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something the service cannot fix by itself: one line, problem and fix."""

    vmid: int | None
    message: str
    exit_code: int = int(ExitCode.FAILURE)
    # What the problem is about when its words may change while it lasts (OVSDB first
    # "lost", then "cannot reach"): the service logs its end only when this is gone.
    key: str = ""

    @classmethod
    def of(cls, err: AgentError, vmid: int | None = None, key: str = "") -> "Problem":
        return cls(vmid, str(err), int(err.exit_code), key)

    @property
    def identity(self) -> tuple[int | None, str]:
        return (self.vmid, self.key or self.message)

    def __str__(self) -> str:
        if self.vmid is None or f"VM {self.vmid}" in self.message:
            return self.message
        return f"VM {self.vmid}: {self.message}"


@dataclasses.dataclass(frozen=True)
class LocalVm:
    """A VM whose config lives in this node's folder."""

    vmid: int
    config: VmConfig

    @property
    def enabled(self) -> bool:
        """The agent's hookscript is set: the agent keeps its args and ports."""
        return is_agent_hook(self.config.section(MAIN).get("hookscript"))

    @property
    def proxmox_lock(self) -> str:
        """`lock:` of the config (backup, snapshot, ...): Proxmox refuses config writes then."""
        return self.config.section(MAIN).get("lock", "")


@dataclasses.dataclass(frozen=True)
class NodeState:
    """One observation of this node. `spec`, `ovs` or `qemu_version` is None when it could
    not be read; `problems` then says why."""

    vms: tuple[LocalVm, ...] = ()
    running: frozenset[int] = frozenset()  # QEMU runs here (pidfile of a live process)
    busy: frozenset[int] = frozenset()  # Proxmox's VM lock is held
    remote_nodes: Mapping[int, str] = dataclasses.field(default_factory=dict)  # VMs living elsewhere
    spec: ClusterSpec | None = ClusterSpec()
    ovs: OvsState | None = None
    ovs_sockets: tuple[str, ...] = ()  # socket file names in the `ovs` socket folder
    socket_dirs: Mapping[Backend, Path] = dataclasses.field(default_factory=dict)
    qemu_version: tuple[int, int, int] | None = None
    problems: tuple[Problem, ...] = ()
    cluster_fs: str = CLUSTER_FS_OK  # /etc/pve: ok, not mounted (nothing read), read-only (no quorum)
    netdevs: LinkState | None = None  # the host's network devices (QinQ on Linux bridges); None: not read
    # Link ends: what the running QEMU of each enabled VM with link ends has (VMs whose
    # QEMU could not be asked are left out), and where their peers are.
    links: Mapping[int, RunningLinks] = dataclasses.field(default_factory=dict)
    link_facts: LinkFacts | None = None

    @property
    def enabled_vms(self) -> tuple[LocalVm, ...]:
        return tuple(vm for vm in self.vms if vm.enabled)
