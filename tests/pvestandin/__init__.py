"""A faithful stand-in for the parts of Proxmox VE the agent meets, for tests only.

It follows ../shared/reference/platform-facts.md: `layout` (a cluster's /etc/pve and one
root folder per node), `vmconfig` (VM config files), `cmdline` (config -> QEMU command
line, checked against Proxmox's own cfg2cmd corpus), `hooks` (hookscript resolution and
calls), `qm` (start/stop/crash/migrate with real QEMU) and `pve_bridge` (the tap plug
scripts QEMU runs). Nothing here is imported by the product.
"""

from pvestandin.cmdline import Command, ConfigError, NotModelled
from pvestandin.hooks import HookRun, TaskLog
from pvestandin.layout import Cluster, Node
from pvestandin.qm import (
    MigrationFailed,
    Qm,
    RunningVm,
    StandinError,
    StartAborted,
    StartFailed,
    kill_leftovers,
    migrate,
)

__all__ = [
    "Cluster", "Command", "ConfigError", "HookRun", "MigrationFailed", "Node", "NotModelled", "Qm",
    "RunningVm", "StandinError", "StartAborted", "StartFailed", "TaskLog", "kill_leftovers", "migrate",
]
