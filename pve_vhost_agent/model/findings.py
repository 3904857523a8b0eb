"""What `pve-vhost-agent doctor` reports: findings, each a severity, a subject, the problem and the fix.

A finding reads like the agent's errors (errors.py): one line, the problem, then what to
do about it. The subject names the thing to look at (an interface, bond, bridge, VM NIC
or OVS setting) so that a report sorts and filters by it.
"""

from __future__ import annotations

import dataclasses
import enum


class Severity(str, enum.Enum):
    """How bad a finding is; only `error` makes `doctor` exit non-zero."""

    ERROR = "error"  # traffic is lost or a VM will not start as declared
    WARNING = "warning"  # works now, but fragile or slow (redundancy lost, stalls, drift)
    INFO = "info"  # worth knowing; nothing to fix

    @property
    def rank(self) -> int:
        return ("error", "warning", "info").index(self.value)


@dataclasses.dataclass(frozen=True)
class Finding:
    severity: Severity
    subject: str  # e.g. "bond0", "vmbr0", "VM 100 net1", "Open vSwitch other_config:dpdk-init"
    problem: str
    fix: str
    check: str = ""  # which check found it, e.g. "bond-partner" (stable, for scripts)

    def __str__(self) -> str:
        line = f"{self.severity.value}: {self.subject}: {self.problem}" + (f"; {self.fix}" if self.fix else "")
        return " ".join(line.split())  # one line, always (journald, systemd's status, task logs)

    def fields(self) -> dict:
        """The `--json` form."""
        return {"severity": self.severity.value, "subject": self.subject, "problem": self.problem,
                "fix": self.fix, "check": self.check}


def sorted_findings(findings) -> tuple[Finding, ...]:
    """Errors first, then warnings, then info; by subject within each; duplicates once."""
    unique = dict.fromkeys(findings)
    return tuple(sorted(unique, key=lambda f: (f.severity.rank, f.subject, f.check, f.problem)))


def error_count(findings) -> int:
    return sum(1 for f in findings if f.severity is Severity.ERROR)
