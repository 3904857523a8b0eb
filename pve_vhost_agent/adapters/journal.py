"""Logging for the agent: structured entries to journald, short lines for humans.

Set up once, at an entry point (CLI, hook, service), with `setup_logging`; modules only
call `logging.getLogger(__name__)`. The agent's context fields (VM id, hook phase, NIC,
port, ...) travel in a record's `extra` under lower-case names and become upper-case
journal fields, so `journalctl SYSLOG_IDENTIFIER=pve-vhost-agent VMID=100` tells a VM's
story. The human lines go to Proxmox's task log: one line per record, and never one that
starts like the line a migration source parses (see `guard_line`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import TextIO


SYSLOG_IDENTIFIER = "pve-vhost-agent"
# journald's native socket. `systemd.journal.send` drops entries silently when it is
# missing, so its presence is the cheap way to know whether anything reaches journald.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# journald takes field names of upper-case letters, digits and underscores.
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]*")
# `extra` keys carried into journal fields (upper-cased), in this order.
CONTEXT_FIELDS = ("vmid", "phase", "nic", "port", "bridge", "action", "result", "duration_ms")
# A migration source reads the target's `qm start` output and takes a line starting
# with this as the address to migrate to: such a line from a hook breaks migration.
MIGRATION_LINE_PREFIX = "migration listens on"
GUARD_PREFIX = f"{SYSLOG_IDENTIFIER}: "

# syslog priorities (journald's PRIORITY field) for Python's levels.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7


def priority(levelno: int) -> int:
    """syslog priority of a logging level (custom levels round down to the next one)."""
    for level, prio in _PRIORITIES:
        if levelno >= level:
            return prio
    return _DEBUG_PRIORITY


def context_fields(record: logging.LogRecord) -> dict[str, str]:
    """The agent's context fields present on `record`, as journal fields: the fixed ones
    (VMID, PHASE, ...) and an action's own (`extra={"fields": action.fields()}`)."""
    fields = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            fields[name.upper()] = str(value)
    for name, value in (getattr(record, "fields", None) or {}).items():
        if value is not None and _FIELD_NAME.fullmatch(name):
            fields[name.upper()] = str(value)
    return fields


def guard_line(line: str) -> str:
    """`line`, prefixed when it would start like a migration address line."""
    if line.lower().startswith(MIGRATION_LINE_PREFIX):
        return GUARD_PREFIX + line
    return line


def guard_text(text: str) -> str:
    """`text` with every line passed through `guard_line` (for any human output)."""
    return "\n".join(guard_line(line) for line in text.split("\n"))


class JournalHandler(logging.Handler):
    """Sends each record to journald with the agent's structured fields."""

    def __init__(self) -> None:
        super().__init__()
        from systemd import journal  # only a process that logs to journald loads python3-systemd

        self._send = journal.send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message = f"{message}\n{(self.formatter or logging.Formatter()).formatException(record.exc_info)}"
            self._send(
                message,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                PRIORITY=str(priority(record.levelno)),
                SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
                LOGGER=record.name,
                **context_fields(record),
            )
        except Exception:  # logging's contract: report through handleError, never raise
            self.handleError(record)


class HumanFormatter(logging.Formatter):
    """One short line per record: `WARN: ...`/`ERROR: ...` for problems, else the message."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text}: {record.exc_info[1]}"
        # One line per record: a newline would split it in Proxmox's task log.
        line = " ".join(text.split())
        if record.levelno >= logging.ERROR:
            line = f"ERROR: {line}"
        elif record.levelno >= logging.WARNING:
            line = f"WARN: {line}"
        return guard_line(line)


class _AgentHandlerMixin:
    """Marks the handlers `setup_logging` installs, so a second call replaces them."""


class _HumanHandler(_AgentHandlerMixin, logging.StreamHandler):
    pass


class _AgentJournalHandler(_AgentHandlerMixin, JournalHandler):
    pass


def log_traceback(err: BaseException, what: str, socket_path: str = JOURNAL_SOCKET) -> bool:
    """One journald entry with `err`'s traceback (never on a terminal); False when
    journald is not there to take it."""
    if not journald_available(socket_path):
        return False
    try:
        import traceback

        from systemd import journal

        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        journal.send(f"{what}: {err!r}\n{text}", PRIORITY="3", SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
    except Exception:  # noqa: BLE001 - reporting a bug must not raise another
        return False
    return True


def journald_available(socket_path: str = JOURNAL_SOCKET) -> bool:
    """True when journald's socket exists (without it every entry is silently lost)."""
    return os.path.exists(socket_path)


def setup_logging(
    *,
    journal: bool,
    human_stream: TextIO | None,
    level: int = logging.INFO,
    socket_path: str = JOURNAL_SOCKET,
) -> bool:
    """Configure the root logger once for this process (call it at the entry point only).

    Human lines go to `human_stream` (None: none); with `journal`, entries also go to
    journald. Returns whether journald gets them: False when `journal` is off or its
    socket is missing, in which case a warning says so on the human stream.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _AgentHandlerMixin)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    if human_stream is not None:
        human = _HumanHandler(human_stream)
        human.setFormatter(HumanFormatter())
        root.addHandler(human)
    if not journal:
        return False
    if not journald_available(socket_path):
        logging.getLogger(__name__).warning(
            "journald socket %s is missing: log entries go only to this output", socket_path
        )
        return False
    root.addHandler(_AgentJournalHandler())
    return True


class ContextLogger(logging.LoggerAdapter):
    """A logger that adds fixed context fields (e.g. vmid, phase) to every record.

    Unlike the stdlib adapter (before Python 3.13), a call's own `extra` is merged with
    the fixed fields instead of being replaced by them.
    """

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **(kwargs.get("extra") or {})}
        return msg, kwargs


def context_logger(logger: logging.Logger | logging.LoggerAdapter, **fields: object) -> ContextLogger:
    """`logger` with `fields` (lower-case names from CONTEXT_FIELDS) on every record."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown context fields {sorted(unknown)}; use {', '.join(CONTEXT_FIELDS)}")
    if isinstance(logger, logging.LoggerAdapter):
        fields = {**logger.extra, **fields}
        logger = logger.logger
    return ContextLogger(logger, fields)
