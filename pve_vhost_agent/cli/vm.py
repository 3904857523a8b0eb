"""`show VMID` and `apply VMID|--all`: the planned args line, and writing it."""

from __future__ import annotations

import json

import click

from pve_vhost_agent.cli.common import VMID
from pve_vhost_agent.errors import AgentError, ExitCode
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.flows import adopt as adopt_flow
from pve_vhost_agent.flows.vmargs import VmArgs, apply_vms, vm_args


def args_row(result: VmArgs) -> dict:
    sync, location = result.sync, result.location
    return {
        "vmid": location.vmid,
        "node": location.node,
        "running": location.running,
        "args": list(sync.plan.args),
        "current": list(sync.current),
        "in_sync": sync.in_sync,
        "changes": list(sync.changes),
        "notes": list(sync.plan.notes),
        "section": sync.section,
        "args_line": sync.line_after,
        "nics": [nic.name for nic in result.spec.nics],
        "qinq": [entry.name for entry in result.spec.tap_qinq],
    }


@click.command("show")
@click.argument("vmid", type=VMID)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def show(settings: Settings, vmid: int, as_json: bool) -> None:
    """Show the args the agent plans for VM VMID, why, and whether the config has them."""
    result = vm_args(settings, vmid)
    if as_json:
        click.echo(json.dumps(args_row(result), indent=2))
        return
    sync = result.sync
    click.echo(f"VM {vmid} on node {result.location.node}"
               + (" (running)" if result.location.running else ""))
    for note in sync.plan.notes:
        click.echo(f"  - {note}")
    click.echo("planned args (agent's part):")
    click.echo("  " + (" ".join(sync.plan.args) or "(none)"))
    if sync.in_sync:
        click.echo("the VM config has exactly these args")
    else:
        click.echo("the VM config differs:")
        for change in sync.changes:
            click.echo(f"  {change}")
        click.echo(f"fix: pve-vhost-agent apply {vmid}")


@click.command("apply")
@click.argument("vmid", type=VMID, required=False)
@click.option("--all", "all_vms", is_flag=True, help="Every VM of this node with a spec (or left-over agent args).")
@click.option("--dry-run", is_flag=True, help="Print what would be written; write nothing.")
@click.pass_obj
def apply(settings: Settings, vmid: int | None, all_vms: bool, dry_run: bool) -> None:
    """Write the planned args into the VM config (pending for a running VM)."""
    if (vmid is None) == (not all_vms):
        raise click.UsageError("give either VMID or --all")
    failed: list[AgentError] = []
    for one, result in apply_vms(settings, None if all_vms else vmid, dry_run):
        if isinstance(result, AgentError):
            click.echo(f"VM {one}: {result}", err=True)
            failed.append(result)
            continue
        for line in args_lines(result, dry_run):
            click.echo(line)
    if failed:
        raise SystemExit(int(failed[0].exit_code) if len(failed) == 1 else int(ExitCode.FAILURE))


def args_lines(result: VmArgs, dry_run: bool) -> list[str]:
    """Where a VM's args stand after `apply` (or would, in a dry run), one line each."""
    sync, vmid = result.sync, result.location.vmid
    if sync.in_sync:
        return [f"VM {vmid}: args up to date"]
    where = "as a pending change" if sync.section == "pending" else "to the VM config"
    changes = "; ".join(sync.changes)
    if dry_run:
        return [f"VM {vmid}: dry run: would write args {where}: {sync.line_after or '(delete args)'} ({changes})"]
    lines = [f"VM {vmid}: args written {where} ({changes})"]
    if result.location.running:
        lines.append(f"VM {vmid} is running: the new args take effect at its next start")
    return lines




@click.command("adopt")
@click.argument("vmid", type=VMID, required=False)
@click.option("--all", "all_vms", is_flag=True, help="Every VM of this node with hand-written vhost-user args.")
@click.option("--bridge", default="vhostbr0", show_default=True,
              help="OVS bridge of adopted NICs whose socket QEMU served (a hand-written line does not name it).")
@click.option("--patched-qinq", is_flag=True,
              help="Read NICs with tag + trunks as the patched Network.pm does: QinQ with S-tag = tag, C-VLANs = trunks.")
@click.option("--dry-run", is_flag=True, help="Show the whole plan; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_obj
def adopt(settings: Settings, vmid: int | None, all_vms: bool, bridge: str, patched_qinq: bool, dry_run: bool,
          as_json: bool) -> None:
    """Turn hand-written vhost-user args (the TNSR recipe) into declared NICs, keeping MACs and your other args."""
    if (vmid is None) == (not all_vms):
        raise click.UsageError("give either VMID or --all")
    if all_vms:
        results = adopt_flow.adopt_all(settings, bridge, patched_qinq, dry_run)
    else:
        results = [(vmid, adopt_flow.adopt(settings, vmid, bridge, patched_qinq, dry_run))]
    rows, code = [], ExitCode.OK
    for one, result in results:
        if isinstance(result, AgentError):
            rows.append({"vmid": one, "error": str(result)})
            code = result.exit_code if code == ExitCode.OK else ExitCode.FAILURE
            if not as_json:
                click.echo(f"VM {one}: {result}", err=True)
            continue
        plan = result.plan
        rows.append({"vmid": one, "nics": [n.name for n in plan.nics], "qinq": [q.name for q in plan.tap_qinq],
                     "notes": list(plan.notes), "refusals": list(plan.refusals), "written": result.written,
                     "args": result.config_after.effective().get("args") if result.config_after else None})
        if plan.refusals:
            code = ExitCode.CONFLICT if code == ExitCode.OK else ExitCode.FAILURE
        if not as_json:
            for line in _adopt_lines(result):
                click.echo(line, err=bool(plan.refusals))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    raise SystemExit(int(code))


def _adopt_lines(result) -> list[str]:
    plan, vmid = result.plan, result.plan.vmid
    if plan.refusals:
        return [f"VM {vmid}: cannot adopt: {why}" for why in plan.refusals] + [f"VM {vmid}: nothing was written"]
    verb = "dry run: would declare" if result.dry_run else "declared"
    lines = [f"VM {vmid}: {verb} {note}" for note in plan.notes]
    args = result.config_after.effective().get("args") or "(none)"
    where = "would become" if result.dry_run else "is now"
    lines.append(f"VM {vmid}: its args line {where}: {args}")
    return lines


COMMANDS = [show, apply, adopt]
