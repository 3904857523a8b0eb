"""`service` (what pve-vhost-agent.service runs) and `status` (its one-line summary, on demand)."""

from __future__ import annotations

import json
import sys

import click

from pve_vhost_agent.cli.common import SecondsType
from pve_vhost_agent.settings import Settings


@click.command("service", short_help="Keep this node in step (the systemd service).")
@click.option("--interval", type=SecondsType(0.5, 86400), default=10.0, show_default=True,
              envvar="PVE_VHOST_AGENT_INTERVAL",
              help="Seconds between passes (a change in Open vSwitch or SIGHUP starts one early; "
                   "env PVE_VHOST_AGENT_INTERVAL, e.g. in /etc/default/pve-vhost-agent).")
@click.option("--once", is_flag=True, help="One pass, then exit: non-zero when there are problems.")
@click.option("--dry-run", is_flag=True, help="One pass that prints the plan and changes nothing.")
@click.pass_obj
def service(settings: Settings, interval: float, once: bool, dry_run: bool) -> None:
    """Keep this node in step: args, QinQ on re-plugged taps, leftovers of gone VMs, status."""
    from pve_vhost_agent.flows import service as svc  # python3-openvswitch/systemd only when needed

    if not dry_run:
        sys.exit(svc.run_service(settings, interval, once, echo=click.echo))
    with svc.Service(settings) as node:
        report = node.check()
    for action in report.plan.actions:
        click.echo(f"would: {action.sentence()}")
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    click.echo(report.line("dry run"))
    sys.exit(report.exit_code)


@click.command("status", short_help="One line: this node's VMs, ports, problems.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def status(settings: Settings, as_json: bool) -> None:
    """One line: the agent's VMs, ports and problems on this node (exit 1 or more on problems)."""
    from pve_vhost_agent.flows import service as svc

    with svc.Service(settings) as node:
        report = node.check()
    line = report.line("checked")
    if as_json:
        click.echo(json.dumps({**report.summary(), "line": line}, indent=2))
    else:
        click.echo(line)
    sys.exit(report.exit_code)


COMMANDS = [service, status]
