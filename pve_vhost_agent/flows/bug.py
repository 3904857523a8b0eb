"""An unexpected exception (a bug): its traceback goes to journald, the user gets one line."""

from __future__ import annotations

from pve_vhost_agent.adapters.journal import log_traceback
from pve_vhost_agent.errors import Unexpected


def unexpected(err: BaseException) -> Unexpected:
    """`err` as the agent's error (one line: what happened, and that it is a bug to report);
    its traceback is sent to journald, never to the terminal."""
    logged = log_traceback(err, f"unexpected {type(err).__name__}, a bug in pve-vhost-agent")
    return Unexpected.of(err, " (the traceback is in the journal: journalctl SYSLOG_IDENTIFIER=pve-vhost-agent)"
                         if logged else " (journald was not reachable for its traceback)")
