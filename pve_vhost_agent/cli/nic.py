"""`nic add|set|remove|list` and `qinq set|remove`: declare NICs in the cluster-wide spec.

These commands change /etc/pve/pve-vhost-agent.cfg (under the cluster lock); on an
enabled VM they bring its args line in step at once, and on a running one its OVS ports
(vmports: VLAN and MTU in place; what needs a restart is named).
"""

from __future__ import annotations

import json
from typing import Callable

import click

from pve_vhost_agent.plan import declare
from pve_vhost_agent.model import spec
from pve_vhost_agent.formats import specfile
from pve_vhost_agent.errors import NotFound, OvsUnavailable
from pve_vhost_agent.model.names import is_agent_hook
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.adapters.specstore import SpecUpdate, load_spec, update_spec
from pve_vhost_agent.formats.vmlayout import net_devices
from pve_vhost_agent.cli.vm import report_args
from pve_vhost_agent.flows.vmargs import apply_vm_args, sync_for, vm_args
from pve_vhost_agent.formats.vmconfig import MAIN
from pve_vhost_agent.flows.running import follow_running_vm
from pve_vhost_agent.adapters.vmstore import VmLocation, find_vm

_ETHERTYPES = click.Choice([e.value for e in spec.EtherType])
_BACKENDS = click.Choice([b.value for b in spec.Backend])


def _nic_options(command: Callable) -> Callable:
    """The options `nic add` and `nic set` share (applied bottom-up)."""
    options = [
        click.option("--backend", type=_BACKENDS, help="ovs: OVS-DPDK port (default); external: a vhost-user server such as VPP/TNSR."),
        click.option("--tag", type=int, help="Access VLAN (1-4094)."),
        click.option("--trunks", metavar="LIST", help="Allowed VLANs, e.g. 10,20-30."),
        click.option("--qinq", "stag", type=int, metavar="STAG", help="QinQ (dot1q-tunnel) with this service VLAN."),
        click.option("--cvlans", metavar="LIST", help="With --qinq: allowed customer VLANs (default: all)."),
        click.option("--ethertype", type=_ETHERTYPES, help="With --qinq: outer tag type (default 802.1ad)."),
        click.option("--mac", help="MAC address (default: a stable, unique, locally administered one)."),
        click.option("--queues", type=int, help="Queue pairs (multiqueue), 1-64."),
        click.option("--rx-queue-size", type=int, help="256, 512 or 1024 (default)."),
        click.option("--tx-queue-size", type=int, help="256, 512 or 1024 (default)."),
        click.option("--mtu", type=int, help="MTU of the port."),
        click.option("--dry-run", is_flag=True, help="Print the section that would be written; write nothing."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _nic_change(options: dict, no_vlan: bool = False) -> declare.NicChange:
    qinq = declare.qinq_policy(options["stag"], options["cvlans"], options["ethertype"])
    return declare.NicChange(
        bridge=options.get("bridge"),
        backend=spec.Backend(options["backend"]) if options["backend"] else None,
        vlan=declare.vlan_policy(options["tag"], options["trunks"], qinq, no_vlan),
        mac=options["mac"],
        queues=options["queues"],
        rx_queue_size=options["rx_queue_size"],
        tx_queue_size=options["tx_queue_size"],
        mtu=options["mtu"],
    )


def _change_spec(settings: Settings, change: Callable[[spec.ClusterSpec], spec.ClusterSpec], dry_run: bool) -> SpecUpdate:
    if dry_run:
        before = load_spec(settings)
        return SpecUpdate(before, change(before))
    return update_spec(settings, change)


def _enabled(settings: Settings, vmid: int) -> VmLocation | None:
    """The VM, when it lives here and has the agent's hookscript: its args follow its spec."""
    try:
        location = find_vm(settings, vmid)
    except NotFound:
        return None
    hook = location.config.section(MAIN).get("hookscript")
    return location if location.local and is_agent_hook(hook) else None


def _checked(settings: Settings, location: VmLocation | None, after: spec.ClusterSpec, vmid: int) -> spec.ClusterSpec:
    """`after`, once the args it implies can be planned for an enabled VM (else it raises:
    a spec the VM could not start with is not written)."""
    if location is not None:
        sync_for(settings, after.for_vm(vmid), location.config, bool(location.running))
    return after


def _declare(settings: Settings, vmid: int, nic: str, rule: Callable, what: str, dry_run: bool) -> None:
    """Apply `rule(cluster, vmid, index, vm_config)` to the spec and report it."""
    index = spec.parse_nic_name(nic)
    location = find_vm(settings, spec.check_vmid(vmid))
    enabled = _enabled(settings, vmid)
    update = _change_spec(
        settings, lambda cluster: _checked(settings, enabled, rule(cluster, vmid, index, location.config), vmid), dry_run)
    _report(settings, update, vmid, index, what, dry_run)
    _follow(settings, vmid, enabled, update, dry_run)


def _follow(settings: Settings, vmid: int, enabled: VmLocation | None, update: SpecUpdate, dry_run: bool) -> None:
    """Bring an enabled VM's args in step at once, and a running one's OVS ports (what its
    QEMU can take now; the rest is named as taking effect at the next start); otherwise
    say how to enable it."""
    if not update.changed:
        return
    if enabled is None:
        if not dry_run:
            click.echo(f"next: `pve-vhost-agent enable {vmid}` sets the hookscript and writes the args line")
        return
    result = vm_args(settings, vmid, update.after) if dry_run else apply_vm_args(settings, vmid, update.after)
    report_args(result, dry_run)
    before, after = update.before.for_vm(vmid), update.after.for_vm(vmid)
    if enabled.running and any(n.backend is spec.Backend.OVS for n in (*before.nics, *after.nics)):
        try:
            lines = follow_running_vm(settings, after, dry_run)
        except OvsUnavailable as err:
            # The spec and args are written (what the next start needs); say who catches up.
            raise OvsUnavailable(f"VM {vmid}: spec and args written, but its running ports were not changed: {err}",
                                 "the service applies the change once Open vSwitch answers again") from err
        for line in lines:
            click.echo(line)


def _remove_command(rule: Callable, what: str, doc: str) -> click.Command:
    """`remove VMID netN [--dry-run]`: the VM need not exist any more."""

    @click.command("remove", help=doc)
    @click.argument("vmid", type=int)
    @click.argument("nic")
    @click.option("--dry-run", is_flag=True, help="Print the section that would be removed; write nothing.")
    @click.pass_obj
    def remove(settings: Settings, vmid: int, nic: str, dry_run: bool) -> None:
        index = spec.parse_nic_name(nic)
        enabled = _enabled(settings, spec.check_vmid(vmid))
        update = _change_spec(settings, lambda cluster: _checked(settings, enabled, rule(cluster, vmid, index), vmid),
                              dry_run)
        _report(settings, update, vmid, index, what, dry_run)
        _follow(settings, vmid, enabled, update, dry_run)

    return remove


def _report(settings: Settings, update: SpecUpdate, vmid: int, index: int, what: str, dry_run: bool) -> None:
    """What was declared (or would be), and the next step."""
    entry = update.after.entry(vmid, index)
    old = update.before.entry(vmid, index)
    if not update.changed:
        click.echo(f"VM {vmid} net{index}: nothing to change")
        return
    if dry_run:
        verb = "write this section to" if entry else "remove this section from"
        click.echo(f"dry run: would {verb} {settings.spec_file}:")
        click.echo(specfile.format_entry(entry or old), nl=False)
        return
    if entry:
        click.echo(f"VM {vmid} net{index}: {what}: {describe(entry)}")
    else:
        click.echo(f"VM {vmid} net{index}: {what} from {settings.spec_file} (was: {describe(old)})")


def describe(entry: spec.VhostNic | spec.TapQinQ) -> str:
    """A short human summary of one entry."""
    if isinstance(entry, spec.TapQinQ):
        return f"QinQ on {entry.port_name}, {_vlan_text(spec.VlanPolicy(qinq=entry.qinq))}"
    parts = [f"vhost-user on bridge {entry.bridge}", f"backend {entry.backend.value}", f"MAC {entry.mac}",
             _vlan_text(entry.vlan)]
    if entry.queues != 1:
        parts.append(f"{entry.queues} queues")
    if entry.mtu is not None:
        parts.append(f"MTU {entry.mtu}")
    return ", ".join(parts)


def _vlan_text(vlan: spec.VlanPolicy) -> str:
    if vlan.qinq:
        text = f"S-tag {vlan.qinq.stag} ({vlan.qinq.ethertype.value})"
        return text + (f" C-VLANs {spec.format_vlan_list(vlan.qinq.cvlans)}" if vlan.qinq.cvlans else "")
    if vlan.tag is not None:
        return f"VLAN tag {vlan.tag}"
    if vlan.trunks:
        return f"trunks {spec.format_vlan_list(vlan.trunks)}"
    return "all VLANs"


@click.group("nic")
def nic_group() -> None:
    """Declare vhost-user NICs of VMs (stored cluster-wide in /etc/pve)."""


@nic_group.command("add")
@click.argument("vmid", type=int)
@click.argument("nic")
@click.option("--bridge", required=True, help="OVS bridge (datapath_type=netdev) the port goes on.")
@_nic_options
@click.pass_obj
def nic_add(settings: Settings, vmid: int, nic: str, dry_run: bool, **options) -> None:
    """Declare a vhost-user NIC netN (N must be free in the VM config)."""
    change = _nic_change(options)
    _declare(settings, vmid, nic, lambda c, v, i, config: declare.add_nic(c, v, i, change, config), "declared", dry_run)


@nic_group.command("set")
@click.argument("vmid", type=int)
@click.argument("nic")
@click.option("--bridge", help="OVS bridge (datapath_type=netdev) the port goes on.")
@click.option("--no-vlan", is_flag=True, help="Drop the VLAN mode: the port carries all VLANs.")
@_nic_options
@click.pass_obj
def nic_set(settings: Settings, vmid: int, nic: str, no_vlan: bool, dry_run: bool, **options) -> None:
    """Change fields of a declared vhost-user NIC (--tag/--trunks/--qinq replace the VLAN mode)."""
    change = _nic_change(options, no_vlan)
    _declare(settings, vmid, nic, lambda c, v, i, config: declare.set_nic(c, v, i, change, config), "changed", dry_run)


nic_group.add_command(_remove_command(declare.remove_nic, "removed",
                                      "Remove a declared vhost-user NIC (the VM need not exist any more)."))


@nic_group.command("list")
@click.argument("vmid", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
@click.pass_obj
def nic_list(settings: Settings, vmid: int | None, as_json: bool) -> None:
    """List declared NICs (vhost-user and QinQ), of one VM or all."""
    cluster = load_spec(settings)
    entries = [e for e in (*cluster.nics, *cluster.tap_qinq) if vmid is None or e.vmid == vmid]
    rows = [_row(settings, e) for e in sorted(entries, key=lambda e: e.key)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no NICs declared" + (f" for VM {vmid}" if vmid is not None else ""))
        return
    for entry in sorted(entries, key=lambda e: e.key):
        click.echo(f"{entry.vmid} {entry.name}: {describe(entry)}")


def _row(settings: Settings, entry: spec.VhostNic | spec.TapQinQ) -> dict:
    """One `nic list --json` object; the same keys for both kinds."""
    vlan = entry.vlan if isinstance(entry, spec.VhostNic) else spec.VlanPolicy(qinq=entry.qinq)
    row = {
        "vmid": entry.vmid, "nic": entry.name,
        "kind": specfile.VHOST if isinstance(entry, spec.VhostNic) else specfile.QINQ,
        "backend": None, "bridge": None, "mac": None,
        "vlan_mode": vlan.mode or None, "tag": vlan.tag, "trunks": list(vlan.trunks),
        "qinq": vlan.qinq.stag if vlan.qinq else None,
        "cvlans": list(vlan.qinq.cvlans) if vlan.qinq else [],
        "ethertype": vlan.qinq.ethertype.value if vlan.qinq else None,
        "queues": None, "rx_queue_size": None, "tx_queue_size": None, "mtu": None,
        "port": entry.port_name, "socket": None,
    }
    if isinstance(entry, spec.VhostNic):
        row.update(backend=entry.backend.value, bridge=entry.bridge, mac=entry.mac, queues=entry.queues,
                   rx_queue_size=entry.rx_queue_size, tx_queue_size=entry.tx_queue_size, mtu=entry.mtu,
                   socket=str(settings.socket_dir(entry.backend.value) / entry.socket_name))
    else:
        row.update(_tap_facts(settings, entry))
    return row


def _tap_facts(settings: Settings, entry: spec.TapQinQ) -> dict:
    """Bridge and MAC of a tap NIC, from its VM config (none when the VM is gone)."""
    try:
        config = find_vm(settings, entry.vmid).config
    except NotFound:
        return {}
    device = net_devices(config.effective()).get(entry.index)
    return {"bridge": device.bridge or None, "mac": device.mac or None} if device else {}


@click.group("qinq")
def qinq_group() -> None:
    """QinQ (dot1q-tunnel) for Proxmox's own tap NICs."""


@qinq_group.command("set")
@click.argument("vmid", type=int)
@click.argument("nic")
@click.option("--qinq", "stag", type=int, required=True, metavar="STAG", help="Service VLAN (1-4094).")
@click.option("--cvlans", metavar="LIST", help="Allowed customer VLANs, e.g. 10,20-30 (default: all).")
@click.option("--ethertype", type=_ETHERTYPES, help="Outer tag type (default 802.1ad).")
@click.option("--dry-run", is_flag=True, help="Print the section that would be written; write nothing.")
@click.pass_obj
def qinq_set(settings: Settings, vmid: int, nic: str, stag: int, cvlans: str | None, ethertype: str | None,
             dry_run: bool) -> None:
    """Declare QinQ for netN, a NIC in the VM config on an OVS bridge with tag=STAG.

    The tag makes Proxmox plug the tap as an access port of the S-VLAN until post-start
    turns it into a QinQ port: never a trunk of every VLAN.
    """
    qinq = declare.qinq_policy(stag, cvlans, ethertype)
    _declare(settings, vmid, nic, lambda c, v, i, config: declare.set_tap_qinq(c, v, i, qinq, config), "declared", dry_run)


qinq_group.add_command(_remove_command(declare.remove_tap_qinq, "QinQ removed",
                                       "Remove the QinQ declared for Proxmox's tap NIC netN."))

COMMANDS = [nic_group, qinq_group]
