"""The agent's error types and the exit codes shared by the CLI and the hookscript.

Every error names the problem and the fix in one line. Low-level errors (OSError,
OVSDB errors, parse errors) are translated once, at the edge that met them.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes. A non-zero exit of the pre-start hook aborts the VM start."""

    OK = 0
    FAILURE = 1
    USAGE = 2  # click's own code for bad command-line usage
    BAD_SPEC = 3
    CONFLICT = 4
    NOT_FOUND = 5
    OVS_UNAVAILABLE = 6
    TIMEOUT = 7
    REFUSED = 8
    STALE = 9
    CLUSTER_DOWN = 10  # /etc/pve is not mounted: pmxcfs (pve-cluster) is not running
    FINDINGS = 11  # `doctor` found at least one error-level finding


class AgentError(Exception):
    """Base of every error the agent reports: `problem`, then what to do about it."""

    exit_code = ExitCode.FAILURE

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem, fix)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        line = self.problem if not self.fix else f"{self.problem}; {self.fix}"
        # One line, always: a newline would split the message in Proxmox's task log.
        return " ".join(line.split())


class SpecError(AgentError):
    """The declared spec (CLI input or the cluster-wide file) is malformed or invalid."""

    exit_code = ExitCode.BAD_SPEC


class ConfigConflict(AgentError):
    """Spec and Proxmox VM config (or user args) contradict each other."""

    exit_code = ExitCode.CONFLICT


class NotEnabled(ConfigConflict):
    """Vhost-user args for a VM without the agent's hookscript: nothing would make its ports."""


class MemoryLayoutError(AgentError):
    """The VM's memory layout cannot be shared safely with a vhost-user backend."""

    exit_code = ExitCode.REFUSED


class NotFound(AgentError):
    """A VM, config file, NIC or port that the command names does not exist."""

    exit_code = ExitCode.NOT_FOUND


class OwnershipError(AgentError):
    """An OVS row or file with the name the agent needs belongs to someone else."""

    exit_code = ExitCode.CONFLICT


class OvsUnavailable(AgentError):
    """OVSDB cannot be reached, or a transaction failed for good."""

    exit_code = ExitCode.OVS_UNAVAILABLE


class AgentTimeout(AgentError):
    """A bounded wait ran out: a lock, or ovs-vswitchd taking a change."""

    exit_code = ExitCode.TIMEOUT


class ClusterReadOnly(AgentError):
    """/etc/pve is read-only (no quorum)."""

    exit_code = ExitCode.REFUSED


class ClusterFsDown(AgentError):
    """/etc/pve is not mounted: pmxcfs is not running, so nothing there can be read."""

    exit_code = ExitCode.CLUSTER_DOWN


class StaleArgs(AgentError):
    """The VM's args line differs from the plan (pre-start must abort the start)."""

    exit_code = ExitCode.STALE


class UsageError(AgentError):
    """The command was called with arguments it cannot take (e.g. an unknown hook phase)."""

    exit_code = ExitCode.USAGE


class CapacityError(AgentError):
    """The host lacks room for the VM's shared memory (pre-start aborts the start)."""

    exit_code = ExitCode.REFUSED


class OvsRefused(AgentError):
    """Open vSwitch is set up in a way the spec cannot safely be applied to (vlan-limit, datapath)."""

    exit_code = ExitCode.REFUSED


class Unexpected(AgentError):
    """An exception the agent did not expect: a bug, said in one line like any error."""

    @classmethod
    def of(cls, err: BaseException, where: str = "") -> "Unexpected":
        """`where`: where the traceback went, e.g. ` (the traceback is in the journal)`."""
        return cls(f"unexpected {type(err).__name__}: {str(err)[:200]}",
                   f"this is a bug in pve-vhost-agent, please report it{where}")


class NetworkRefused(AgentError):
    """The host's Linux networking cannot hold what the spec asks (no uplink, uplink MTU,
    a device name or VLAN that someone else has)."""

    exit_code = ExitCode.REFUSED


class VmBusy(AgentTimeout):
    """Proxmox's lock of the VM is held by someone else (a start, stop, migration or `qm set`)."""


class VmChanged(ConfigConflict):
    """The VM started or stopped between the agent's plan and its change."""
