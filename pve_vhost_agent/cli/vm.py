"""`show VMID` and `apply VMID|--all`: the planned args line, and writing it."""

from __future__ import annotations

import json

import click

from pve_vhost_agent.cli.common import STORAGE, VMID
from pve_vhost_agent.formats.vmconfig import MAIN
from pve_vhost_agent.errors import AgentError, ExitCode, NotEnabled
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
        "enabled": result.enabled,
        "dead_nics": list(result.dead_nics),
    }


@click.command("show", short_help="Show a VM's planned args and why.")
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
    if result.dead_nics:
        click.echo(f"not enabled: VM {vmid} does not have the agent's hookscript, so nothing makes the Open vSwitch "
                   f"ports of {', '.join(result.dead_nics)} at its start: it would start with a dead NIC")
        click.echo(f"fix: pve-vhost-agent enable {vmid}")
    elif not result.enabled and (result.spec.nics or result.spec.tap_qinq):
        click.echo(f"not enabled: VM {vmid} does not have the agent's hookscript; its declarations take effect "
                   f"once it has: pve-vhost-agent enable {vmid}")


@click.command("apply", short_help="Write the planned args line into VM configs.")
@click.argument("vmid", type=VMID, required=False)
@click.option("--all", "all_vms", is_flag=True, help="Every VM of this node with a spec (or left-over agent args).")
@click.option("--dry-run", is_flag=True, help="Print what would be written; write nothing.")
@click.option("--force", is_flag=True,
              help="Write vhost-user args even into a VM without the agent's hookscript (it then starts with "
                   "dead NICs until `enable`).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: each VM's result and the summary.")
@click.pass_obj
def apply(settings: Settings, vmid: int | None, all_vms: bool, dry_run: bool, force: bool, as_json: bool) -> None:
    """Write the planned args into the VM config (pending for a running VM).

    A VM without the agent's hookscript is refused: its vhost-user NICs would have no
    port at start (`enable` sets the hookscript; --force writes anyway). With --all the
    last line sums up; the exit code is 0 when every VM is in step, the VM's own code
    when one VM failed, 1 when several did.
    """
    if (vmid is None) == (not all_vms):
        raise click.UsageError("give either VMID or --all")
    results = apply_vms(settings, None if all_vms else vmid, dry_run, force)
    failed = [result for _one, result in results if isinstance(result, AgentError)]
    summary = apply_summary(results, dry_run)
    if as_json:
        click.echo(json.dumps({
            "dry_run": dry_run,
            "vms": [{"vmid": one, "error": str(result), "exit_code": int(result.exit_code)}
                    if isinstance(result, AgentError) else {**args_row(result), "written": _written(result, dry_run)}
                    for one, result in results],
            "summary": summary, "exit_code": apply_exit_code(failed)}, indent=2))
    else:
        for one, result in results:
            if isinstance(result, AgentError):
                click.echo(f"VM {one}: {result}", err=True)
                continue
            for line in args_lines(result, dry_run):
                click.echo(line)
            if result.dead_nics:
                click.echo(f"warning: VM {one} does not have the agent's hookscript: it starts with dead NICs "
                           f"({', '.join(result.dead_nics)}) until `pve-vhost-agent enable {one}`", err=True)
        if all_vms:
            click.echo(summary)
    if failed:
        raise SystemExit(apply_exit_code(failed))


def _written(result: VmArgs, dry_run: bool) -> bool:
    return not dry_run and not result.sync.in_sync


def apply_exit_code(failed: list[AgentError]) -> int:
    """0 without failures; the VM's own code when one failed; 1 when several did."""
    if not failed:
        return int(ExitCode.OK)
    return int(failed[0].exit_code) if len(failed) == 1 else int(ExitCode.FAILURE)


def apply_summary(results: list[tuple[int, VmArgs | AgentError]], dry_run: bool) -> str:
    """The last line of `apply --all`: how many VMs, written (or to write), up to date, failed."""
    failed = [one for one, result in results if isinstance(result, AgentError)]
    changed = sum(1 for _one, r in results if not isinstance(r, AgentError) and not r.sync.in_sync)
    verb = "to write" if dry_run else "written"
    line = (f"apply: {len(results)} VM{'' if len(results) == 1 else 's'}: {changed} {verb}, "
            f"{len(results) - changed - len(failed)} up to date, {len(failed)} failed")
    if failed:
        line += f" (VM {', '.join(map(str, failed))})"
    if any(isinstance(r, NotEnabled) for _one, r in results):
        line += "; VMs without the agent's hookscript: pve-vhost-agent enable --all"
    return line


def args_lines(result: VmArgs, dry_run: bool) -> list[str]:
    """Where a VM's args stand after `apply` (or would, in a dry run), one line each."""
    sync, vmid = result.sync, result.location.vmid
    if sync.in_sync:
        return [f"VM {vmid}: args up to date"]
    where = "as a pending change" if sync.section == "pending" else "to the VM config"
    changes = "; ".join(sync.changes)
    if sync.args_in_sync:  # only the GUI marks (tag, notes line) change: at once, as Proxmox writes them
        return [f"VM {vmid}: {'dry run: would mark' if dry_run else 'marked'} in the Proxmox GUI ({changes})"]
    if dry_run:
        return [f"VM {vmid}: dry run: would write args {where}: {sync.line_after or '(delete args)'} ({changes})"]
    lines = [f"VM {vmid}: args written {where} ({changes})"]
    if result.location.running:
        lines.append(f"VM {vmid} is running: the new args take effect at its next start")
    return lines


@click.command("adopt", short_help="Turn hand-written vhost-user args into declarations.")
@click.argument("vmid", type=VMID, required=False)
@click.option("--all", "all_vms", is_flag=True, help="Every VM of this node with hand-written vhost-user args.")
@click.option("--bridge", default="vhostbr0", show_default=True,
              help="OVS bridge of adopted NICs whose socket QEMU served (a hand-written line does not name it).")
@click.option("--patched-qinq", is_flag=True,
              help="Read NICs with tag + trunks as the patched Network.pm does: QinQ with S-tag = tag, C-VLANs = trunks.")
@click.option("--storage", type=STORAGE, default="local", show_default=True, help="Storage holding the hookscript.")
@click.option("--dry-run", is_flag=True, help="Show the whole plan; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_obj
def adopt(settings: Settings, vmid: int | None, all_vms: bool, bridge: str, patched_qinq: bool, storage: str,
          dry_run: bool, as_json: bool) -> None:
    """Turn hand-written vhost-user args (the TNSR recipe) into declared NICs, keeping MACs and your other args.

    The VM is enabled in the same write, as `enable` does it (a hookscript it had runs
    after the agent's)."""
    if (vmid is None) == (not all_vms):
        raise click.UsageError("give either VMID or --all")
    if all_vms:
        results = adopt_flow.adopt_all(settings, bridge, patched_qinq, dry_run, storage)
    else:
        results = [(vmid, adopt_flow.adopt(settings, vmid, bridge, patched_qinq, dry_run, storage))]
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
                     "hookscript": result.config_after.section(MAIN).get("hookscript") if result.config_after else None,
                     "chained_hookscript": result.chained,
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
    hook = result.config_after.section(MAIN).get("hookscript")
    lines.append(f"VM {vmid}: hookscript {'would be' if result.dry_run else 'is'} {hook}"
                 + (f"; its own {result.chained} runs after the agent's, in every phase" if result.chained else ""))
    args = result.config_after.effective().get("args") or "(none)"
    where = "would become" if result.dry_run else "is now"
    lines.append(f"VM {vmid}: its args line {where}: {args}")
    return lines


COMMANDS = [show, apply, adopt]
