"""`ovs status VMID`: the Open vSwitch ports the agent made or changed for a VM, and their state."""

from __future__ import annotations

import json

import click

from pve_vhost_agent.cli.common import VMID, Group
from pve_vhost_agent.model.ovs import OWNS_PORT
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import check_vmid


@click.group("ovs", cls=Group, short_help="Show the agent's Open vSwitch ports.")
def ovs_group() -> None:
    """Open vSwitch ports of the agent (read-only)."""


@ovs_group.command("status", short_help="A VM's ports and their state.")
@click.argument("vmid", type=VMID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_obj
def status(settings: Settings, vmid: int, as_json: bool) -> None:
    """List VM VMID's vhost-user ports and QinQ taps with link, ofport and vhost-user state."""
    from pve_vhost_agent.flows.running import port_reports  # python3-openvswitch only for commands that use it

    reports = port_reports(settings, check_vmid(vmid))
    if as_json:
        click.echo(json.dumps({"vmid": vmid, "ports": reports}, indent=2))
        return
    if not reports:
        click.echo(f"VM {vmid}: no Open vSwitch ports made or changed by pve-vhost-agent")
        return
    for r in reports:
        if r["owner"] == OWNS_PORT:
            what = f"vhost-user {r['vhost_mode'] or '?'} {r['vhost_status'] or 'unknown'}, socket {r['socket']}"
        else:
            what = f"Proxmox tap, saved {r['saved_vlan'] or 'default'}"
        line = f"{r['port']} {r['nic']} on {r['bridge']}: {what}; {r['vlan']}; ofport {r['ofport']}, link {r['link_state'] or '?'}"
        click.echo(line + (f"; error: {r['error']}" if r["error"] else ""))


COMMANDS = [ovs_group]
