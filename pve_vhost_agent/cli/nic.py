"""`nic add|set|remove|list` and `qinq set|remove`: declare NICs in the cluster-wide spec.

Options come from the NIC field table (model/fields.py); the work is flows/declare.py.
"""

from __future__ import annotations

import json
from typing import Callable

import click

from pve_vhost_agent.cli.common import VMID, Group
from pve_vhost_agent.cli.vm import args_lines, args_row
from pve_vhost_agent.errors import SpecError
from pve_vhost_agent.flows import declare
from pve_vhost_agent.formats import specfile
from pve_vhost_agent.model import fields, spec
from pve_vhost_agent.settings import Settings


def _field_options(table: tuple[fields.NicField, ...], skip: tuple[str, ...] = ()) -> Callable:
    """One --option per field of `table` (text, read by the field itself)."""
    def decorate(command: Callable) -> Callable:
        for field in reversed(table):
            if field.key in skip:
                continue
            kind = click.Choice(field.choices) if field.choices else str
            metavar = None if field.choices else field.metavar  # click shows the choices
            command = click.option(f"--{field.key}", field.name, type=kind, metavar=metavar, help=field.help)(command)
        return command
    return decorate


def _common(command: Callable) -> Callable:
    command = click.option("--json", "as_json", is_flag=True, help="Print what was declared as one JSON object.")(command)
    command = click.option("--dry-run", is_flag=True, help="Print the section that would be written; write nothing.")(command)
    return command


def _change(options: dict, no_vlan: bool = False) -> fields.NicChange:
    """The fields given on the command line, read by the table."""
    table = fields.NIC_FIELDS + fields.VLAN_FIELDS
    values = fields.read_fields({f.key: options[f.name] for f in table if options.get(f.name) is not None}, table)
    vlan = fields.vlan_policy(values)
    if no_vlan:
        if vlan is not None:
            raise SpecError("--no-vlan and a VLAN option contradict each other", "give one of them")
        vlan = spec.VlanPolicy()
    scalars = {f.name: values[f.name] for f in fields.NIC_FIELDS if f.name in values}
    return fields.NicChange(scalars, vlan)


def _report(settings: Settings, result: declare.Declared, what: str, as_json: bool) -> None:
    """What was declared (or would be), what followed, and the next step."""
    vmid, index = result.vmid, result.index
    if as_json:
        entry = result.entry or result.before
        click.echo(json.dumps({
            "vmid": vmid, "nic": f"net{index}", "changed": result.update.changed, "dry_run": result.dry_run,
            "removed": result.entry is None and result.before is not None,
            "entry": declare.entry_row(settings, entry) if entry else None,
            "args": args_row(result.args) if result.args else None, "notes": list(result.lines)}, indent=2))
        return
    if not result.update.changed:
        click.echo(f"VM {vmid} net{index}: nothing to change")
    elif result.dry_run:
        verb = "write this section to" if result.entry else "remove this section from"
        click.echo(f"dry run: would {verb} {settings.vm_spec_file(vmid)}:")
        click.echo(specfile.format_entry(result.entry or result.before), nl=False)
    elif result.entry:
        click.echo(f"VM {vmid} net{index}: {what}: {result.entry.describe()}")
    else:
        click.echo(f"VM {vmid} net{index}: {what} from {settings.vm_spec_file(vmid)} (was: {result.before.describe()})")
    if result.args is not None:
        for line in args_lines(result.args, result.dry_run):
            click.echo(line)
    for line in result.lines:
        click.echo(line)


@click.group("nic", cls=Group, short_help="Declare vhost-user NICs of VMs.")
def nic_group() -> None:
    """Declare vhost-user NICs of VMs (stored cluster-wide in /etc/pve)."""


@nic_group.command("add", short_help="Declare a vhost-user NIC netN.")
@click.argument("vmid", type=VMID)
@click.argument("nic")
@_field_options(fields.vhost_fields())
@_common
@click.pass_obj
def nic_add(settings: Settings, vmid: int, nic: str, dry_run: bool, as_json: bool, **options) -> None:
    """Declare a vhost-user NIC netN (N must be free in the VM config); --bridge is needed."""
    _report(settings, declare.add_nic(settings, vmid, nic, _change(options), dry_run), "declared", as_json)


@nic_group.command("set", short_help="Change a declared vhost-user NIC.")
@click.argument("vmid", type=VMID)
@click.argument("nic")
@_field_options(fields.vhost_fields())
@click.option("--no-vlan", is_flag=True, help="Drop the VLAN mode: the port carries all VLANs.")
@_common
@click.pass_obj
def nic_set(settings: Settings, vmid: int, nic: str, no_vlan: bool, dry_run: bool, as_json: bool, **options) -> None:
    """Change fields of a declared vhost-user NIC (--tag/--trunks/--qinq replace the VLAN mode)."""
    _report(settings, declare.set_nic(settings, vmid, nic, _change(options, no_vlan), dry_run), "changed", as_json)


@nic_group.command("remove", short_help="Remove a declared vhost-user NIC.")
@click.argument("vmid", type=VMID)
@click.argument("nic")
@_common
@click.pass_obj
def nic_remove(settings: Settings, vmid: int, nic: str, dry_run: bool, as_json: bool) -> None:
    """Remove a declared vhost-user NIC (the VM need not exist any more)."""
    _report(settings, declare.remove_nic(settings, vmid, nic, dry_run), "removed", as_json)


@nic_group.command("list", short_help="List declared NICs.")
@click.argument("vmid", type=VMID, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
@click.pass_obj
def nic_list(settings: Settings, vmid: int | None, as_json: bool) -> None:
    """List declared NICs (vhost-user and QinQ), of one VM or all."""
    entries = declare.list_nics(settings, vmid)
    if as_json:
        click.echo(json.dumps([declare.entry_row(settings, e) for e in entries], indent=2))
    elif not entries:
        click.echo("no NICs declared" + (f" for VM {vmid}" if vmid is not None else ""))
    for entry in [] if as_json else entries:
        click.echo(f"{entry.vmid} {entry.name}: {entry.describe()}")


@click.group("qinq", cls=Group, short_help="Declare QinQ on Proxmox's tap NICs.")
def qinq_group() -> None:
    """QinQ (dot1q-tunnel) for Proxmox's own tap NICs."""


@qinq_group.command("set", short_help="Declare QinQ for a tap NIC netN.")
@click.argument("vmid", type=VMID)
@click.argument("nic")
@_field_options(fields.QINQ_FIELDS)
@_common
@click.pass_obj
def qinq_set(settings: Settings, vmid: int, nic: str, dry_run: bool, as_json: bool, **options) -> None:
    """Declare QinQ for netN, a NIC in the VM config on an OVS or Linux bridge with tag=STAG.

    The tag makes Proxmox plug the tap as an access port of the S-VLAN until post-start
    turns it into a QinQ port: never a trunk of every VLAN.
    """
    given = {f.key: options[f.name] for f in fields.QINQ_FIELDS if options.get(f.name) is not None}
    qinq = fields.qinq_of(fields.read_fields(given, fields.QINQ_FIELDS))
    if qinq is None:
        raise click.UsageError("missing --qinq STAG: give the service VLAN")
    _report(settings, declare.set_tap_qinq(settings, vmid, nic, qinq, dry_run), "declared", as_json)


@qinq_group.command("remove", short_help="Remove a tap NIC's QinQ.")
@click.argument("vmid", type=VMID)
@click.argument("nic")
@_common
@click.pass_obj
def qinq_remove(settings: Settings, vmid: int, nic: str, dry_run: bool, as_json: bool) -> None:
    """Remove the QinQ declared for Proxmox's tap NIC netN."""
    _report(settings, declare.remove_tap_qinq(settings, vmid, nic, dry_run), "QinQ removed", as_json)


@click.command("migrate-spec", short_help="Split the pre-0.2 spec file per VM.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def migrate_spec(settings: Settings, as_json: bool) -> None:
    """Split the single spec file of versions before 0.2 into one file per VM (run on upgrade)."""
    moved = declare.migrate(settings)
    if as_json:
        click.echo(json.dumps({"moved_vms": moved, "spec_dir": str(settings.spec_dir)}, indent=2))
        return
    click.echo(f"moved the declarations of {moved} VMs into {settings.spec_dir}" if moved
               else "nothing to move: the declarations are in one file per VM")


COMMANDS = [nic_group, qinq_group, migrate_spec]
