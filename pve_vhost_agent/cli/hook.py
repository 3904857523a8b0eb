"""`hook`, `install-hook`, `enable` and `disable`: the agent's place in a VM's life cycle."""

from __future__ import annotations

import os
import sys

import click

from pve_vhost_agent.cli.common import STORAGE, VMID
from pve_vhost_agent.flows import enable as hookinstall
from pve_vhost_agent.flows.hook import run_hook
from pve_vhost_agent.settings import Settings


@click.command("hook")
@click.argument("vmid")
@click.argument("phase")
@click.pass_obj
def hook(settings: Settings, vmid: str, phase: str) -> None:
    """Run hook PHASE for VM VMID, as Proxmox calls the hookscript (the hookscript runs this)."""
    sys.exit(run_hook(settings, vmid, phase, os.environ))


@click.command("install-hook")
@click.option("--storage", type=STORAGE, default="local", show_default=True, help="Storage whose snippets/ folder gets the hookscript.")
@click.option("--dry-run", is_flag=True, help="Say what would be installed; write nothing.")
@click.pass_obj
def install_hook(settings: Settings, storage: str, dry_run: bool) -> None:
    """Put the hookscript into a storage's snippets/ folder (executable, replaced atomically)."""
    path, changed = hookinstall.install(settings, storage, dry_run)
    verb = ("dry run: would install it at" if dry_run else "installed at") if changed else "already up to date at"
    click.echo(f"hookscript {verb} {path}")
    click.echo(f"use it on a VM with: pve-vhost-agent enable <vmid>{'' if storage == 'local' else f' --storage {storage}'}")


@click.command("enable")
@click.argument("vmid", type=VMID)
@click.option("--storage", type=STORAGE, default="local", show_default=True, help="Storage holding the hookscript.")
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
@click.pass_obj
def enable(settings: Settings, vmid: int, storage: str, dry_run: bool) -> None:
    """Set the agent's hookscript on VM VMID (chaining one it had) and write its args."""
    for line in hookinstall.enable(settings, vmid, storage, dry_run):
        click.echo(line)


@click.command("disable")
@click.argument("vmid", type=VMID)
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
@click.pass_obj
def disable(settings: Settings, vmid: int, dry_run: bool) -> None:
    """Undo `enable`: the VM's previous hookscript back, the agent's args gone."""
    for line in hookinstall.disable(settings, vmid, dry_run):
        click.echo(line)


COMMANDS = [hook, install_hook, enable, disable]
