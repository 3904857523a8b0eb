"""The hookscript's entry point: `<script> <vmid> <phase>`, as Proxmox calls it.

No click and no command groups: a start pays only for what its phase uses. The hook
takes its settings from the environment as every command does (PVE_VHOST_AGENT_ROOT,
_OVSDB and _NODE; Proxmox sets none of them, so a node runs with the defaults) and
PVE_MIGRATED_FROM from Proxmox. Everything it says is one line per step.
"""

from __future__ import annotations

import sys
from typing import Mapping, Sequence

from pve_vhost_agent.errors import AgentError, ExitCode, UsageError
from pve_vhost_agent.settings import ENV_NODE, ENV_OVSDB, ENV_ROOT, Settings


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """The exit code for Proxmox (pre-start's non-zero aborts the start)."""
    try:
        if len(argv) != 2:
            raise UsageError(f"the hookscript takes <vmid> <phase>, got {len(argv)} arguments",
                             "Proxmox calls it as `<script> <vmid> <phase>`")
        settings = Settings.checked(env.get(ENV_ROOT), env.get(ENV_OVSDB), env.get(ENV_NODE))
        from pve_vhost_agent.flows.hook import run_hook  # after the checks: a bad call costs nothing
        return int(run_hook(settings, argv[0], argv[1], env))
    except AgentError as err:
        return _say(str(err), int(err.exit_code))
    except Exception as err:  # noqa: BLE001 - one line, never a traceback (pre-start's non-zero aborts the start)
        from pve_vhost_agent.flows.bug import unexpected  # only on this path

        return _say(str(unexpected(err)), int(ExitCode.FAILURE))


def _say(line: str, code: int) -> int:
    try:
        print(f"pve-vhost-agent: {line}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - stderr gone or unencodable: the exit code still says it
        pass
    return code
