"""`doctor`: one report of what is wrong with this host's network for its VMs, read only."""

from __future__ import annotations

import json
import sys

import click

from pve_vhost_agent.errors import ExitCode
from pve_vhost_agent.model.findings import Severity
from pve_vhost_agent.settings import Settings


@click.command("doctor", short_help="Check the host network, OVS-DPDK and the agent.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: {\"findings\": [...]}.")
@click.pass_obj
def doctor(settings: Settings, as_json: bool) -> None:
    """Check /etc/network/interfaces against the kernel (bonds, VLANs, bridges, MTUs, NAT),
    Open vSwitch and OVS-DPDK against the declared NICs, and the agent's own state.

    Exit code 0 without error-level findings, 11 with at least one."""
    from pve_vhost_agent.flows.doctor import run_doctor  # netlink and OVS only for this command

    findings = run_doctor(settings)
    counts = {s: sum(1 for f in findings if f.severity is s) for s in Severity}
    if as_json:
        click.echo(json.dumps({"findings": [f.fields() for f in findings], "errors": counts[Severity.ERROR],
                               "warnings": counts[Severity.WARNING], "info": counts[Severity.INFO]}, indent=2))
    else:
        for found in findings:
            click.echo(str(found))
        click.echo(f"{_count(counts[Severity.ERROR], 'error')}, {_count(counts[Severity.WARNING], 'warning')}, "
                   f"{counts[Severity.INFO]} info")
    sys.exit(int(ExitCode.FINDINGS) if counts[Severity.ERROR] else int(ExitCode.OK))


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


COMMANDS = [doctor]
