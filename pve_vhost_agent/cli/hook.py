"""`hook`, `install-hook`, `enable` and `disable`: the agent's place in a VM's life cycle."""

from __future__ import annotations

import json
import os
import sys

import click

from pve_vhost_agent.cli.common import STORAGE, VMID
from pve_vhost_agent.cli.vm import apply_exit_code
from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.flows import enable as hookinstall
from pve_vhost_agent.flows.hook import run_hook
from pve_vhost_agent.flows.vmargs import vms_to_enable
from pve_vhost_agent.settings import Settings


def _json_option(command):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")(command)


@click.command("hook", short_help="Run a hook phase (the hookscript runs it).")
@click.argument("vmid")
@click.argument("phase")
@click.pass_obj
def hook(settings: Settings, vmid: str, phase: str) -> None:
    """Run hook PHASE for VM VMID, as Proxmox calls the hookscript (the hookscript runs this)."""
    sys.exit(run_hook(settings, vmid, phase, os.environ))


@click.command("install-hook", short_help="Copy the hookscript into a storage.")
@click.option("--storage", type=STORAGE, default="local", show_default=True, help="Storage whose snippets/ folder gets the hookscript.")
@click.option("--dry-run", is_flag=True, help="Say what would be installed; write nothing.")
@_json_option
@click.pass_obj
def install_hook(settings: Settings, storage: str, dry_run: bool, as_json: bool) -> None:
    """Put the hookscript into a storage's snippets/ folder (executable, replaced atomically).

    The folder is the storage's `path` plus its snippets folder: `snippets`, or what the
    storage's `content-dirs` option names for snippets (as Proxmox resolves it).
    """
    path, changed = hookinstall.install(settings, storage, dry_run)
    if as_json:
        click.echo(json.dumps({"storage": storage, "path": str(path), "folder": str(path.parent),
                               "changed": changed, "dry_run": dry_run}, indent=2))
        return
    verb = ("dry run: would install it at" if dry_run else "installed at") if changed else "already up to date at"
    click.echo(f"hookscript {verb} {path}")
    click.echo(f"use it on a VM with: pve-vhost-agent enable <vmid>{'' if storage == 'local' else f' --storage {storage}'}")


@click.command("enable", short_help="Set the agent's hookscript; write the args.")
@click.argument("vmid", type=VMID, required=False)
@click.option("--all", "all_vms", is_flag=True,
              help="Every VM of this node with declared NICs or QinQ but without the agent's hookscript.")
@click.option("--storage", type=STORAGE, default="local", show_default=True, help="Storage holding the hookscript.")
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
@_json_option
@click.pass_obj
def enable(settings: Settings, vmid: int | None, all_vms: bool, storage: str, dry_run: bool, as_json: bool) -> None:
    """Set the agent's hookscript on VM VMID (chaining one it had) and write its args.

    It also marks the VM where the Proxmox GUI shows it: the tag `vhost-user` and a line
    in its notes naming its vhost-user NICs. With --all the last line sums up; the exit
    code is as for `apply --all`.
    """
    if (vmid is None) == (not all_vms):
        raise click.UsageError("give either VMID or --all")
    vmids = vms_to_enable(settings) if all_vms else [vmid]
    done: list[dict] = []
    failed: list[AgentError] = []
    for one in vmids:
        try:
            lines = hookinstall.enable(settings, one, storage, dry_run)
        except AgentError as err:
            if not all_vms:
                raise
            failed.append(err)
            done.append({"vmid": one, "error": str(err), "exit_code": int(err.exit_code)})
            if not as_json:
                click.echo(f"VM {one}: {err}", err=True)
            continue
        done.append({"vmid": one, "lines": lines})
        if not as_json:
            for line in lines:
                click.echo(line)
    summary = (f"enable: {len(vmids)} VM{'' if len(vmids) == 1 else 's'}: {len(vmids) - len(failed)} "
               f"{'to enable' if dry_run else 'enabled'}, {len(failed)} failed")
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "vms": done, "summary": summary,
                               "exit_code": apply_exit_code(failed)}, indent=2))
    elif all_vms:
        click.echo(summary)
    if failed:
        raise SystemExit(apply_exit_code(failed))


@click.command("disable", short_help="Undo enable: the hookscript and args back.")
@click.argument("vmid", type=VMID)
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
@_json_option
@click.pass_obj
def disable(settings: Settings, vmid: int, dry_run: bool, as_json: bool) -> None:
    """Undo `enable`: the VM's previous hookscript back, the agent's args and marks gone."""
    lines = hookinstall.disable(settings, vmid, dry_run)
    if as_json:
        click.echo(json.dumps({"vmid": vmid, "dry_run": dry_run, "lines": lines}, indent=2))
        return
    for line in lines:
        click.echo(line)


COMMANDS = [hook, install_hook, enable, disable]
