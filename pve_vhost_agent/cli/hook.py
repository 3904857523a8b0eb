"""`hook`, `install-hook`, `enable` and `disable`: the agent's place in a VM's life cycle."""

from __future__ import annotations

import logging
import os
import sys

import click

from pve_vhost_agent.flows import enable as hookinstall
from pve_vhost_agent.errors import AgentError, ExitCode
from pve_vhost_agent.flows.hook import HookCall, has_leftovers, read_config, roll_back, run_chained, run_phase, uses_agent
from pve_vhost_agent.adapters.journal import setup_logging
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.adapters.specstore import load_spec

log = logging.getLogger(__name__)


@click.command("hook")
@click.argument("vmid")
@click.argument("phase")
@click.pass_obj
def hook(settings: Settings, vmid: str, phase: str) -> None:
    """Run hook PHASE for VM VMID, as Proxmox calls the hookscript (the hookscript runs this)."""
    call = HookCall.from_argv(vmid, phase, os.environ)
    vm = load_spec(settings).for_vm(call.vmid)
    config = read_config(settings, call)
    # Also without a spec: a clone's copied args, or what a VM left whose spec went.
    ours = uses_agent(vm, config) or has_leftovers(settings, call, config)
    if not ours and vm.chained_hook is None:
        return  # not the agent's VM: silent, as Proxmox's task log should be
    code = ExitCode.OK
    if ours:
        setup_logging(journal=True, human_stream=sys.stdout)
        try:
            run_phase(settings, call, vm, config)
        except AgentError as err:
            fields = {"vmid": call.vmid, "phase": call.phase, "result": "failed"}
            if call.phase == "pre-start":
                log.error("VM %s: start aborted: %s", call.vmid, err, extra=fields)
                sys.exit(int(err.exit_code))
            # Only pre-start can change what Proxmox does; later phases warn, and what is
            # left behind is the service's to clean up.
            log.warning("VM %s: %s: %s", call.vmid, call.phase, err, extra=fields)
    if vm.chained_hook is not None:
        chained = run_chained(settings, vm.chained_hook, call, os.environ)
        if chained != 0 and call.phase == "pre-start" and vm:
            log.error("VM %s: start aborted by the chained hookscript %s; undoing this pre-start",
                      call.vmid, vm.chained_hook.hookscript, extra={"vmid": call.vmid, "phase": call.phase})
            roll_back(settings, call, vm, config)
        code = chained
    sys.exit(int(code))


@click.command("install-hook")
@click.option("--storage", default="local", show_default=True, help="Storage whose snippets/ folder gets the hookscript.")
@click.option("--dry-run", is_flag=True, help="Say what would be installed; write nothing.")
@click.pass_obj
def install_hook(settings: Settings, storage: str, dry_run: bool) -> None:
    """Put the hookscript into a storage's snippets/ folder (executable, replaced atomically)."""
    path, changed = hookinstall.install(settings, storage, dry_run)
    verb = ("dry run: would install it at" if dry_run else "installed at") if changed else "already up to date at"
    click.echo(f"hookscript {verb} {path}")
    click.echo(f"use it on a VM with: pve-vhost-agent enable <vmid>{'' if storage == 'local' else f' --storage {storage}'}")


@click.command("enable")
@click.argument("vmid", type=int)
@click.option("--storage", default="local", show_default=True, help="Storage holding the hookscript.")
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
@click.pass_obj
def enable(settings: Settings, vmid: int, storage: str, dry_run: bool) -> None:
    """Set the agent's hookscript on VM VMID (chaining one it had) and write its args."""
    for line in hookinstall.enable(settings, vmid, storage, dry_run):
        click.echo(line)


@click.command("disable")
@click.argument("vmid", type=int)
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
@click.pass_obj
def disable(settings: Settings, vmid: int, dry_run: bool) -> None:
    """Undo `enable`: the VM's previous hookscript back, the agent's args gone."""
    for line in hookinstall.disable(settings, vmid, dry_run):
        click.echo(line)


COMMANDS = [hook, install_hook, enable, disable]
