"""`link add|remove|list`: VM-to-VM point-to-point links (stored cluster-wide in /etc/pve).

The work is flows/links.py.
"""

from __future__ import annotations

import json

import click

from pve_vhost_agent.cli.common import Group
from pve_vhost_agent.cli.vm import args_lines, args_row
from pve_vhost_agent.flows import links
from pve_vhost_agent.formats import specfile
from pve_vhost_agent.model import spec
from pve_vhost_agent.settings import Settings


def _report(settings: Settings, result: links.LinkChange, verb: str, as_json: bool) -> None:
    entries = result.entries
    if as_json:
        click.echo(json.dumps({
            "ends": [e.end for e in entries] or [f"{v}:net{i}" for v, i in result.ends],
            "changed": result.update.changed, "dry_run": result.dry_run,
            "entries": [{"end": e.end, "peer": e.peer_end, "mac": e.mac, "port": e.port, "peer_port": e.peer_port,
                         "mtu": e.mtu, "file": str(settings.vm_spec_file(e.vmid))} for e in entries],
            "args": [args_row(a) for a in result.args], "notes": list(result.lines)}, indent=2))
        return
    if not result.update.changed:
        click.echo("nothing to change")
    elif result.dry_run:
        for entry in entries:
            click.echo(f"dry run: would {'write this section to' if verb == 'added' else 'remove this section from'} "
                       f"{settings.vm_spec_file(entry.vmid)}:")
            click.echo(specfile.format_entry(entry), nl=False)
    else:
        for entry in entries:
            click.echo(f"VM {entry.vmid} {entry.name}: link {verb}: {entry.describe()}")
    for vm_args in result.args:
        for line in args_lines(vm_args, result.dry_run):
            click.echo(line)
    for line in result.lines:
        click.echo(line)


@click.group("link", cls=Group, short_help="Join two VM NICs point to point (LLDP, STP pass).")
def link_group() -> None:
    """Join VM NICs point to point (VM-to-VM links).

    Two VM NICs joined like a wire: LLDP and STP pass."""


@link_group.command("add", short_help="Declare a link between two VM NICs.")
@click.argument("first", metavar="VMID:netN")
@click.argument("second", metavar="VMID:netM")
@click.option("--mtu", type=click.IntRange(spec.MTU_MIN, spec.LINK_MTU_MAX),
              help="Guest MTU of both ends (default: what a 1500-byte underlay carries whole, "
                   "1458 on IPv4 and 1438 on IPv6 cluster addresses).")
@click.option("--mac", "macs", multiple=True, metavar="MAC",
              help="MAC of the first end, given again for the second (default: random, unique).")
@click.option("--dry-run", is_flag=True, help="Print the sections that would be written; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print what was declared as one JSON object.")
@click.pass_obj
def link_add(settings: Settings, first: str, second: str, mtu: int | None, macs: tuple[str, ...], dry_run: bool,
             as_json: bool) -> None:
    """Join NIC netN of one VM to NIC netM of another (or the same) VM, point to point.

    Each netN must be free in its VM config. Each end gets a UDP port from 20000-29999
    (unique in the cluster); ends on one node talk over 127.0.0.1, ends on different nodes
    over each node's ring0_addr (/etc/pve/corosync.conf).
    """
    _report(settings, links.add(settings, first, second, mtu, macs, dry_run), "added", as_json)


@link_group.command("remove", short_help="Remove a link (give either end).")
@click.argument("end", metavar="VMID:netN")
@click.option("--dry-run", is_flag=True, help="Print the sections that would be removed; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as one JSON object.")
@click.pass_obj
def link_remove(settings: Settings, end: str, dry_run: bool, as_json: bool) -> None:
    """Remove the link one of whose ends is VMID:netN (both ends; the VMs need not exist)."""
    _report(settings, links.remove(settings, end, dry_run), "removed", as_json)


@link_group.command("list", short_help="List links, their ends and where they run.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of links.")
@click.pass_obj
def link_list(settings: Settings, as_json: bool) -> None:
    """List the links: each end, the node it is on, and its state on this node."""
    found, problems = links.rows(settings)
    if as_json:
        click.echo(json.dumps({"links": found, "problems": list(problems)}, indent=2))
        return
    if not found:
        click.echo("no links declared")
    for link in found:
        click.echo(f"{link['link']} (MTU {link['mtu']})")
        for end in link["ends"]:
            click.echo(f"  {end['end']}: port {end['port']}, MAC {end['mac']}, {end['state']}")
    for problem in problems:
        click.echo(f"problem: {problem}")


COMMANDS = [link_group]
