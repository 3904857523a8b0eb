"""The OVSDB edge: one IDL connection, consistent snapshots, and plans applied in steps.

Uses only the part of python3-openvswitch's `ovs.db.idl` API that Debian 12 (OVS 3.1)
and Debian 13 (OVS 3.5) share: `Idl`, `SchemaHelper(schema_json=...)`,
`register_columns`, `Transaction` with `commit()`/`increment()`/`verify()`, and the
`Row` map/set mutators. Not used: 3.5's `Transaction.add_op` (absent in 3.1),
`insert(persist_uuid=True)` (3.1 sends a bad UUID), the `Monitor` enum (ints in 3.1,
strings in 3.5), and `commit_block()` (it has no timeout).

Every wait is bounded by `timeout` seconds; the schema is taken from the server, so
the agent registers only columns that server has.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import time
from typing import Any, Callable, ContextManager, Iterator, Sequence

import ovs.db.idl
import ovs.jsonrpc
import ovs.poller
import ovs.stream

from pve_vhost_agent.errors import AgentError, AgentTimeout, OvsUnavailable
from pve_vhost_agent.model.actions import OvsAction, ReplaceVhostPort
from pve_vhost_agent.adapters.ovsrows import COLUMNS, TxnView, read_state, root_row, write
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.settings import Settings

log = logging.getLogger(__name__)

DATABASE = "Open_vSwitch"
MAX_ATTEMPTS = 5  # TRY_AGAIN retries of one step
# Bound for ovsdb-server's answer to a commit made under a guard (Proxmox's VM lock, which
# `qm start` waits only 10 s for); the wait for ovs-vswitchd comes after the guard.
GUARDED_COMMIT = 2.0
UNREACHABLE_FIX = "is openvswitch-switch running? (systemctl status openvswitch-switch)"
VSWITCHD_FIX = "is ovs-vswitchd running? (systemctl status openvswitch-switch; /var/log/openvswitch/ovs-vswitchd.log)"

Txn = ovs.db.idl.Transaction
Guard = Callable[[], ContextManager[Any]]


class Ovsdb:
    """One OVSDB connection per process, opened on first use; close() or use as a context."""

    def __init__(self, remote: str, timeout: float):
        self.remote = remote
        self.timeout = timeout
        self._idl: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Ovsdb":
        return cls(settings.ovsdb, settings.ovs_timeout)

    def __enter__(self) -> "Ovsdb":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._idl is not None:
            self._idl.close()
            self._idl = None

    # --- reading --------------------------------------------------------------------

    def snapshot(self) -> OvsState:
        idl = self._connected()
        idl.run()
        return read_state(idl, self.remote)

    def live(self) -> bool:
        """True while connected and monitoring: only then is a snapshot current.

        After a dropped connection the IDL keeps its last rows while it reconnects, and
        `snapshot()` would return them unchanged.
        """
        idl = self._idl
        if idl is None:
            return False
        idl.run()
        # No public accessor in OVS 3.1 or 3.5; ovsdbapp reads the session the same way.
        monitoring = getattr(idl, "IDL_S_MONITORING", idl.state)
        return idl._session.is_connected() and idl.state == monitoring

    @property
    def change_seqno(self) -> int:
        """Changes whenever the replicated tables change; read right after `snapshot()`
        it names that snapshot's version (for `wait_for_change`)."""
        return self._connected().change_seqno

    def wait_for_change(self, seqno: int, timeout: float, wake_fds: Sequence[int] = ()) -> bool:
        """Block until the tables differ from `seqno`, the connection drops, one of
        `wake_fds` is readable, or `timeout` seconds pass. True for a change or a drop."""
        idl = self._connected()
        deadline = time.monotonic() + timeout
        while True:
            idl.run()
            if idl.change_seqno != seqno or not idl._session.is_connected():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller = ovs.poller.Poller()
            idl.wait(poller)
            for fd in wake_fds:
                poller.fd_wait(fd, select.POLLIN)
            poller.timer_wait(int(remaining * 1000) + 1)
            poller.block()
            if wake_fds and select.select(list(wake_fds), [], [], 0)[0]:
                return False

    # --- writing --------------------------------------------------------------------

    def apply(self, actions: Sequence[OvsAction], guard: Guard | None = None) -> None:
        """Apply a plan: one transaction per step, each waited for until ovs-vswitchd has it.

        A step ends after an action the next one depends on (`barrier`): vlan-limit
        before a datapath exists, a bridge before its ports, a removed port before the
        same name is added with a new socket path. `guard` is entered around each
        step's build and commit only, never around the wait for ovs-vswitchd.
        """
        for step in _steps(actions):
            what = ", ".join(f"{type(a).__name__} {_subject(a)}" for a in step[:3])
            if len(step) > 3:
                what += f" and {len(step) - 3} more"
            self.transact(lambda view, step=step: [write(view, a) for a in step], what, guard=guard)
            log.debug("applied %s", what)

    def transact(self, build: Callable[[TxnView], Any], what: str, *, wait_vswitchd: bool = True,
                 guard: Guard | None = None) -> bool:
        """Run `build` on a new transaction and commit it; True when something changed.

        TRY_AGAIN (a verified column changed meanwhile, or the connection dropped) calls
        `build` again on fresh rows, a bounded number of times; every other failure
        raises. With `wait_vswitchd`, returns only after ovs-vswitchd applied the change.
        Inside `guard` (e.g. a VM lock) the commit waits at most GUARDED_COMMIT seconds.
        """
        idl = self._connected()
        deadline = time.monotonic() + self.timeout
        for attempt in range(1, MAX_ATTEMPTS + 1):
            with guard() if guard else contextlib.nullcontext():
                idl.run()
                seqno = idl.change_seqno
                txn = Txn(idl)
                try:
                    txn.add_comment(f"pve-vhost-agent: {what}")
                    build(TxnView(idl, txn, self.remote))
                    if wait_vswitchd:
                        root_row(idl, self.remote).increment("next_cfg")
                except BaseException:
                    txn.abort()
                    raise
                bound = min(deadline, time.monotonic() + GUARDED_COMMIT) if guard else deadline
                status = self._commit(txn, bound, what)
            if status == Txn.UNCHANGED:
                return False
            if status == Txn.SUCCESS:
                if wait_vswitchd:
                    self._await_vswitchd(txn.get_increment_new_value(), deadline, what)
                return True
            if status != Txn.TRY_AGAIN:
                raise OvsUnavailable(f"OVSDB at {self.remote} refused {what}: {txn.get_error()}",
                                     "nothing of this step was applied; check the input and ovsdb-server's log")
            log.info("OVSDB asked to try %s again (attempt %d)", what, attempt)
            self._run_until(lambda: idl.change_seqno != seqno, deadline,
                            lambda: OvsUnavailable(f"OVSDB at {self.remote} asked to retry {what} but sent no update",
                                                   UNREACHABLE_FIX))
        raise OvsUnavailable(f"{what}: OVSDB at {self.remote} asked to try again {MAX_ATTEMPTS} times",
                             "another client keeps changing the same rows; run the command again")

    # --- connection and waiting -------------------------------------------------------

    def _connected(self) -> Any:
        if self._idl is None:
            deadline = time.monotonic() + self.timeout
            helper = ovs.db.idl.SchemaHelper(schema_json=self._server_schema(deadline))
            tables = helper.schema_json["tables"]
            for table, columns in COLUMNS.items():
                if table in tables:
                    helper.register_columns(table, [c for c in columns if c in tables[table]["columns"]])
            idl = ovs.db.idl.Idl(self.remote, helper)
            self._idl = idl
            try:
                self._run_until(idl.has_ever_connected, deadline,
                                lambda: self._unreachable(f"no reply within {self.timeout:g} s"))
            except AgentError:
                self.close()
                raise
            log.debug("connected to OVSDB at %s", self.remote)
        return self._idl

    def _server_schema(self, deadline: float) -> dict:
        """The server's own schema (a hook must not trust a schema file on disk)."""
        error, stream = ovs.stream.Stream.open(self.remote)
        if error:
            raise self._unreachable(os.strerror(error))
        rpc = None
        try:
            while (error := stream.connect()) == errno.EAGAIN:
                self._block(deadline, "connect", stream.run_wait, stream.connect_wait)
            if error:
                raise self._unreachable(os.strerror(error))
            rpc = ovs.jsonrpc.Connection(stream)
            request = ovs.jsonrpc.Message.create_request("get_schema", [DATABASE])
            if error := rpc.send(request):
                raise self._unreachable(os.strerror(error))
            while True:
                rpc.run()
                error, msg = rpc.recv()
                if error == errno.EAGAIN:
                    self._block(deadline, "get_schema", rpc.wait, rpc.recv_wait)
                elif error:
                    raise self._unreachable("connection closed" if error == ovs.jsonrpc.EOF else os.strerror(error))
                elif msg.id == request.id:
                    break
        finally:
            (rpc or stream).close()
        if msg.type == ovs.jsonrpc.Message.T_ERROR:
            raise OvsUnavailable(f"OVSDB at {self.remote} has no {DATABASE} database ({msg.error})",
                                 "point --ovsdb at Open vSwitch's database socket")
        return msg.result

    def _unreachable(self, why: str) -> OvsUnavailable:
        return OvsUnavailable(f"cannot reach OVSDB at {self.remote} ({why})", UNREACHABLE_FIX)

    def _block(self, deadline: float, what: str, *waits: Callable[[Any], None]) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._unreachable(f"{what} took longer than {self.timeout:g} s")
        poller = ovs.poller.Poller()
        for wait in waits:
            wait(poller)
        poller.timer_wait(int(remaining * 1000) + 1)
        poller.block()

    def _run_until(self, ready: Callable[[], bool], deadline: float, timeout: Callable[[], AgentError]) -> None:
        idl = self._idl
        while True:
            idl.run()
            if ready():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timeout()
            poller = ovs.poller.Poller()
            idl.wait(poller)
            poller.timer_wait(int(remaining * 1000) + 1)
            poller.block()

    def _commit(self, txn: Any, deadline: float, what: str) -> str:
        idl = self._idl
        bound = deadline - time.monotonic()
        status = txn.commit()
        while status == Txn.INCOMPLETE:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(f"OVSDB at {self.remote} did not answer {what} within {bound:.3g} s",
                                   f"it may still apply it; {UNREACHABLE_FIX}")
            idl.run()
            poller = ovs.poller.Poller()
            idl.wait(poller)
            txn.wait(poller)
            poller.timer_wait(int(remaining * 1000) + 1)
            poller.block()
            status = txn.commit()
        # The IDL returns None when it could not encode a value: treat as a hard error.
        return status or Txn.ERROR

    def _await_vswitchd(self, target: int, deadline: float, what: str) -> None:
        root = lambda: root_row(self._idl, self.remote)  # noqa: E731 - the row object changes on reconnect
        self._run_until(
            lambda: root().cur_cfg >= target, deadline,
            lambda: AgentTimeout(
                f"ovs-vswitchd did not apply {what} within {self.timeout:g} s "
                f"(cur_cfg {root().cur_cfg} < next_cfg {target})", VSWITCHD_FIX),
        )


def _steps(actions: Sequence[OvsAction]) -> Iterator[list[OvsAction]]:
    step: list[OvsAction] = []
    for action in actions:
        step.append(action)
        if action.barrier:
            yield step
            step = [action.add] if isinstance(action, ReplaceVhostPort) else []
    if step:
        yield step


def _subject(action: OvsAction) -> str:
    for field in ("port", "bridge", "limit", "datapath_type"):
        if hasattr(action, field):
            return str(getattr(action, field))
    return ""
