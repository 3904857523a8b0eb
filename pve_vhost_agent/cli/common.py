"""What every command group shares: the group class, the value types of the command line,
and the one place where any error becomes one line on stderr and an exit code.

Numbers on the command line are ASCII digits (Python's int() and float() also take `²`,
`١٠٠` or `1_000`), and a usage error is one line like the agent's own, with the fix.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from typing import Sequence

import click

from pve_vhost_agent.errors import AgentError, ExitCode
from pve_vhost_agent.flows.bug import unexpected
from pve_vhost_agent.model.spec import is_decimal

PROG = "pve-vhost-agent"
# Proxmox's storage ids (pve-storage `pve-storage-id`).
_STORAGE_ID = re.compile(r"[a-z][a-z0-9._-]*[a-z0-9]", re.ASCII)
_SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,3})?", re.ASCII)


class Group(click.Group):
    """A command group that names the closest command when one is mistyped."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1, cutoff=0.5)
            fix = f"did you mean `{ctx.command_path} {close[0]}`?" if close else f"see `{ctx.command_path} -h`"
            raise click.UsageError(f"no such command {name[:40]!r}; {fix}", ctx)
        return super().resolve_command(ctx, args)


class VmIdType(click.ParamType):
    """A VM id in ASCII digits (its range is the model's to check: spec.check_vmid)."""

    name = "vmid"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not is_decimal(str(value)):
            self.fail(f"{str(value)[:40]!r} is not a VM id (digits 0-9, e.g. 100)", param, ctx)
        return int(value)


class SecondsType(click.ParamType):
    """Seconds as ASCII digits with an optional fraction, within [low, high]."""

    name = "seconds"

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value) and self.low <= value <= self.high:
            return value
        if not _SECONDS.fullmatch(str(value)) or not self.low <= float(value) <= self.high:
            self.fail(f"{str(value)[:40]!r} is not a number of seconds from {self.low:g} to {self.high:g}", param, ctx)
        return float(value)


class StorageIdType(click.ParamType):
    """A Proxmox storage id, as `pvesm` accepts it."""

    name = "storage"

    def convert(self, value, param, ctx):
        if not _STORAGE_ID.fullmatch(str(value)):
            self.fail(f"{str(value)[:40]!r} is not a storage id (e.g. local)", param, ctx)
        return str(value)


VMID = VmIdType()
STORAGE = StorageIdType()


def call(group: click.Group, argv: Sequence[str] | None = None) -> int:
    """Run `group` on `argv` (default: the process's): the exit code. Every error, of any
    kind, is one line on stderr; an unexpected one is named a bug (its traceback goes to
    journald), never a traceback on the terminal."""
    try:
        result = group.main(args=list(argv) if argv is not None else None, prog_name=PROG, standalone_mode=False)
    except SystemExit as done:  # sys.exit() in a command (hook, service, status)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else _say(str(done.code), 1))
    except AgentError as err:
        return _say(str(err), int(err.exit_code))
    except click.UsageError as err:
        return _usage(err)
    except click.ClickException as err:
        return _say(one_line(err.format_message()), err.exit_code)
    except click.Abort:
        return _say("interrupted; nothing more was done", 130)
    except Exception as err:  # noqa: BLE001 - the last resort: one line, never a traceback
        return _say(str(unexpected(err)), int(ExitCode.FAILURE))
    return result if isinstance(result, int) else 0


def _usage(err: click.UsageError) -> int:
    no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", None)  # click 8.2: a group without its command
    if no_args_help is not None and isinstance(err, no_args_help) and err.ctx is not None:
        click.echo(err.ctx.get_help())
        return int(ExitCode.USAGE)
    if isinstance(err, click.NoSuchOption):
        message = f"no such option {err.option_name}"
        if err.possibilities:
            message += f"; did you mean {' or '.join(sorted(err.possibilities)[:3])}?"
    else:
        message = one_line(err.format_message()).rstrip(".")
        message = message[:1].lower() + message[1:]
    path = err.ctx.command_path if err.ctx is not None else PROG
    if ";" not in message:
        message += f"; see `{path} -h`"
    return _say(message, int(ExitCode.USAGE))


def one_line(text: str) -> str:
    return " ".join(text.split())


def _say(line: str, code: int) -> int:
    try:
        click.echo(f"{PROG}: {one_line(line)}", err=True)
    except Exception:  # noqa: BLE001 - stderr gone or unencodable: the exit code still says it
        pass
    return code


def run(group: click.Group) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:  # a byte that is not UTF-8 (a VM config may hold one) is shown escaped, not a crash
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    sys.exit(call(group))
