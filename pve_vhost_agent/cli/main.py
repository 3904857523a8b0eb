"""The `pve-vhost-agent` command: global options, error handling, subcommand registry.

Each subcommand group lives in a module of its own in this package (it takes the
`Settings` through `click.pass_obj`, never importing this module) and is added to `main`
at the bottom; the group's only job is to build the one `Settings` value.
"""

from __future__ import annotations

from pathlib import Path

import click

from pve_vhost_agent import __version__
from pve_vhost_agent.cli import common
from pve_vhost_agent.settings import DEFAULT_OVSDB, ENV_NODE, ENV_OVSDB, ENV_ROOT, Settings


@click.group(cls=common.Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pve-vhost-agent")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    envvar=ENV_ROOT,
    help="Folder under which every host path (/etc/pve, /run, /var/lock, /var/lib/vz) is taken "
    "(env PVE_VHOST_AGENT_ROOT: the hookscript gets only <vmid> <phase>).",
)
@click.option("--ovsdb", default=DEFAULT_OVSDB, show_default=True, envvar=ENV_OVSDB,
              help="OVSDB socket, unix:PATH (env PVE_VHOST_AGENT_OVSDB).")
@click.option("--node", default=None, envvar=ENV_NODE,
              help="This node's Proxmox name [default: short host name] (env PVE_VHOST_AGENT_NODE).")
@click.pass_context
def main(ctx: click.Context, root: Path, ovsdb: str, node: str | None) -> None:
    """Declare vhost-user NICs and QinQ ports of Proxmox VMs; keep args and OVS in step."""
    ctx.obj = Settings.checked(root.absolute(), ovsdb, node)


def run() -> None:
    """Console entry point (also used by `python3 -m pve_vhost_agent`): every error, of any
    kind, ends as one line on stderr and its exit code (cli/common.call)."""
    common.run(main)


# Subcommand modules, one per group; each exports `COMMANDS`.
from pve_vhost_agent.cli import doctor, hook, link, nic, ovs, service, vm  # noqa: E402  (imported after `main` exists)

SUBCOMMAND_MODULES: tuple = (nic, link, vm, ovs, hook, service, doctor)

for _module in SUBCOMMAND_MODULES:
    for _command in _module.COMMANDS:
        main.add_command(_command)
