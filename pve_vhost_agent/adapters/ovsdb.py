"""The OVSDB edge: one IDL connection, consistent snapshots, and plans applied in steps.

Uses only the part of python3-openvswitch's `ovs.db.idl` API that Debian 12 (OVS 3.1)
and Debian 13 (OVS 3.5) share: `Idl`, `SchemaHelper(schema_json=...)`,
`register_columns`, `Transaction` with `commit()`/`increment()`/`verify()`, and the
`Row` map/set mutators. Not used: 3.5's `Transaction.add_op` (absent in 3.1),
`insert(persist_uuid=True)` (3.1 sends a bad UUID), the `Monitor` enum (ints in 3.1,
strings in 3.5), and `commit_block()` (it has no timeout).

Every wait is bounded by `timeout` seconds; the schema is taken from the server, so
the agent registers only columns that server has.

A connection is scoped (`Scope`) to the rows its user needs, so its cost does not grow
with the switch: Port and Interface are monitored with a condition. A hook's connection
sees its VM's port names, and Bridge without its `ports` column (a bridge of thousands
of ports would otherwise be read in full): which bridge holds one of its ports is asked
with a `select` on a short side connection. The service's sees the agent's own rows
(owner marks, declared ports), keeps Bridge.ports, and follows changes (`watch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import select
import sys
import time
import uuid
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

# python-ovs imports `ssl` at once for its ssl: remotes, which the agent refuses
# (settings accepts unix: only); keeping it out saves every hook the OpenSSL load.
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import ovs.db.idl  # noqa: E402
import ovs.jsonrpc  # noqa: E402
import ovs.poller  # noqa: E402
import ovs.stream  # noqa: E402

from pve_vhost_agent.adapters import vswitchd
from pve_vhost_agent.errors import AgentError, AgentTimeout, OvsUnavailable
from pve_vhost_agent.model.actions import Action, ReplaceVhostPort
from pve_vhost_agent.adapters.ovsrows import COLUMNS, TxnView, read_state, root_row, write
from pve_vhost_agent.model.ovs import OWNER, OWNS_PORT, OWNS_VLAN, OvsState
from pve_vhost_agent.model.vswitchd import verdict
from pve_vhost_agent.settings import Settings

log = logging.getLogger(__name__)

DATABASE = "Open_vSwitch"
MAX_ATTEMPTS = 5  # TRY_AGAIN retries of one step
# Bound for ovsdb-server's answer to a commit made under a guard (Proxmox's VM lock, which
# `qm start` waits only 10 s for); the wait for ovs-vswitchd comes after the guard.
GUARDED_COMMIT = 2.0
UNREACHABLE_FIX = "is openvswitch-switch running? (systemctl status openvswitch-switch)"
VSWITCHD_FIX = "is ovs-vswitchd running? (systemctl status openvswitch-switch; /var/log/openvswitch/ovs-vswitchd.log)"
VSWITCHD_LOG_FIX = "see systemctl status openvswitch-switch and /var/log/openvswitch/ovs-vswitchd.log"
# How long a wait for ovs-vswitchd goes on while its process keeps working (model/vswitchd).
BUSY_TIMEOUT = 300.0

# Actions per transaction: a cold service pass over 1,000 VMs commits in a few of them.
MAX_STEP_ACTIONS = 1000

Txn = ovs.db.idl.Transaction
# guard(vmids) -> context yielding (the VMs whose actions may go in, {vmid: why not} for the rest)
Guard = Callable[[frozenset[int]], ContextManager[tuple[frozenset[int], dict[int, str]]]]


@dataclasses.dataclass(frozen=True)
class Step:
    """One committed transaction of a plan: its actions, the VMs left out and why."""

    actions: tuple[Action, ...]
    skipped: dict[int, str]
    duration_ms: int
    cfg: int  # the next_cfg it set (0: nothing changed)


@dataclasses.dataclass(frozen=True)
class Scope:
    """Which Port and Interface rows a connection replicates: those named, and with `owned`
    every row carrying the agent's owner mark. `bridge_ports` replicates Bridge.ports (the
    service, which keeps its replica); without it a port's bridge is asked of the server."""

    names: frozenset[str] = frozenset()
    owned: bool = False
    bridge_ports: bool = False

    def conditions(self, table: str) -> list:
        found: list = [["name", "==", name] for name in sorted(self.names)]
        if self.owned:
            marks = (OWNS_PORT, OWNS_VLAN) if table == "Port" else (OWNS_PORT,)  # taps' interfaces carry none
            found += [["external_ids", "includes", ["map", [[OWNER, mark]]]] for mark in marks]
        return found or [False]


class Ovsdb:
    """One OVSDB connection per process, opened on first use; close() or use as a context."""

    def __init__(self, remote: str, timeout: float, ports: Iterable[str] | Scope | None = None,
                 busy_timeout: float = BUSY_TIMEOUT):
        self.remote = remote
        self.timeout = timeout
        self.busy_timeout = max(busy_timeout, timeout)
        # What a scoped connection sees (None: every row).
        self.scope = ports if isinstance(ports, Scope) or ports is None else Scope(frozenset(ports))
        self._idl: Any = None
        self._cached: tuple[int, OvsState] | None = None  # the snapshot of a change_seqno

    @classmethod
    def from_settings(cls, settings: Settings, ports: Iterable[str] | Scope | None = None) -> "Ovsdb":
        return cls(settings.ovsdb, settings.ovs_timeout, ports, settings.ovs_busy_timeout)

    def watch(self, scope: Scope) -> None:
        """Replicate `scope` from now on; returns once the server sends exactly those rows."""
        idl = self._connected()
        if scope == self.scope:
            return
        self.scope = scope
        wanted = max(idl.cond_change(table, scope.conditions(table)) for table in ("Port", "Interface"))
        self._run_until(lambda: idl.cond_seqno >= wanted, time.monotonic() + self.timeout,
                        lambda: self._unreachable(f"the server did not take the new monitoring condition "
                                                  f"within {self.timeout:g} s"))

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
        """The replicated rows as values; the same value while nothing changed, when the
        bridges' ports are replicated too (a service pass then costs nothing here)."""
        idl = self._connected()
        idl.run()
        bridges = self._port_bridges(idl)
        if bridges is not None:
            return read_state(idl, self.remote, bridges)
        if self._cached is None or self._cached[0] != idl.change_seqno:
            self._cached = (idl.change_seqno, read_state(idl, self.remote))
        return self._cached[1]

    def _port_bridges(self, idl: Any) -> dict[uuid.UUID, str] | None:
        """The bridge of each replicated port, asked of the server when Bridge.ports is not
        replicated (None: the replica says it)."""
        if self.scope is None or self.scope.bridge_ports:
            return None
        ports = list(idl.tables["Port"].rows)
        if not ports:
            return {}
        ops = [{"op": "select", "table": "Bridge", "where": [["ports", "includes", ["uuid", str(port)]]],
                "columns": ["name"]} for port in ports]
        results = self._rpc("transact", [DATABASE, *ops], time.monotonic() + self.timeout)
        return {port: result["rows"][0]["name"] for port, result in zip(ports, results) if result.get("rows")}

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

    def apply(self, actions: Sequence[Action], *, guard: Guard | None = None,
              on_step: Callable[[Step], None] | None = None, wait: bool = True) -> None:
        """Apply a plan: one transaction per step, then wait until ovs-vswitchd has it all.

        A step ends after an action the next one depends on (`barrier`: vlan-limit before
        a datapath exists, a bridge before its ports, a removed port before the same name
        is added with a new socket path); only there, and after the last step, does it
        wait for ovs-vswitchd. A large step is committed in chunks.

        `guard(vmids)` is entered around each transaction's build and commit, never around
        a wait for ovs-vswitchd; it yields the VMs whose actions may go in (the others
        are left out of that step, reported in `Step.skipped`). `on_step` hears of each
        step once it is committed, so a caller can log it and knows what to undo. `wait=False`
        waits for nothing after the last step (an undo: ovs-vswitchd may be the problem).
        """
        target = 0
        for actions_of_step, barrier in _steps(actions):
            for chunk in _chunks(actions_of_step):
                step = self._commit_step(chunk, guard)
                target = max(target, step.cfg)
                if on_step is not None:
                    on_step(step)
            if barrier and target:
                self._await_vswitchd(target, time.monotonic() + self.timeout, _what(actions_of_step))
                target = 0
        if target and wait:
            self._await_vswitchd(target, time.monotonic() + self.timeout, _what(actions))

    def _commit_step(self, actions: Sequence[Action], guard: Guard | None) -> "Step":
        vmids = frozenset(a.vmid for a in actions if getattr(a, "vmid", None) is not None)
        started = time.monotonic()
        allowed: list[Action] = []
        skipped: dict[int, str] = {}

        @contextlib.contextmanager
        def step_guard() -> Iterator[None]:
            if guard is None:
                allowed[:] = actions
                yield
                return
            with guard(vmids) as (ok, why):
                allowed[:] = [a for a in actions if getattr(a, "vmid", None) is None or a.vmid in ok]
                skipped.clear()
                skipped.update(why)
                yield

        def build(view: TxnView) -> None:
            for action in allowed:
                write(view, action)

        cfg = self._transact(build, _what(actions), wait_vswitchd=False, bump_cfg=True, guard=step_guard,
                            skip_empty=lambda: not allowed)
        return Step(tuple(allowed), skipped, round((time.monotonic() - started) * 1000), cfg)

    def transact(self, build: Callable[[TxnView], Any], what: str, *, wait_vswitchd: bool = True) -> bool:
        """Run `build` on a new transaction and commit it; True when something changed.

        TRY_AGAIN (a verified column changed meanwhile, or the connection dropped) calls
        `build` again on fresh rows, a bounded number of times; every other failure
        raises. With `wait_vswitchd`, returns only after ovs-vswitchd applied the change.
        """
        return self._transact(build, what, wait_vswitchd=wait_vswitchd) != 0

    def _transact(self, build: Callable[[TxnView], Any], what: str, *, wait_vswitchd: bool = True,
                  bump_cfg: bool = False, guard: Callable[[], ContextManager[Any]] | None = None,
                  skip_empty: Callable[[], bool] = lambda: False) -> int:
        """`transact`, returning the next_cfg it set (1 when it set none, 0: unchanged).

        `bump_cfg` raises next_cfg without waiting. Inside `guard` (e.g. a VM lock) the
        commit waits at most GUARDED_COMMIT seconds; `skip_empty()`, asked inside the
        guard, skips the commit when nothing is left to do.
        """
        idl = self._connected()
        deadline = time.monotonic() + self.timeout
        for attempt in range(1, MAX_ATTEMPTS + 1):
            with guard() if guard else contextlib.nullcontext():
                if skip_empty():
                    return 0
                idl.run()
                seqno = idl.change_seqno
                txn = Txn(idl)
                try:
                    txn.add_comment(f"pve-vhost-agent: {what}")
                    build(TxnView(idl, txn, self.remote, self._port_bridges(idl)))
                    if wait_vswitchd or bump_cfg:
                        root_row(idl, self.remote).increment("next_cfg")
                except BaseException:
                    txn.abort()
                    raise
                bound = min(deadline, time.monotonic() + GUARDED_COMMIT) if guard else deadline
                status = self._commit(txn, bound, what)
            if status == Txn.UNCHANGED:
                return 0
            if status == Txn.SUCCESS:
                cfg = txn.get_increment_new_value() if (wait_vswitchd or bump_cfg) else 0
                if wait_vswitchd:
                    self._await_vswitchd(cfg, deadline, what)
                return cfg or 1
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
            schema = _registered(self._rpc("get_schema", [DATABASE], deadline))
            helper = ovs.db.idl.SchemaHelper(schema_json=schema)
            scoped = self.scope is not None and not self.scope.bridge_ports
            for table, spec in schema["tables"].items():
                # Registered, not replicated: the IDL can still add and remove a port.
                readonly = ["ports"] if table == "Bridge" and scoped else []
                helper.register_columns(table, list(spec["columns"]), readonly)
            idl = ovs.db.idl.Idl(self.remote, helper)
            if self.scope is not None:
                for table in ("Port", "Interface"):
                    # Acked before the first request, so the first monitor reply is already
                    # only these rows (a condition set later would follow a full download).
                    state = idl.tables[table].condition_state
                    state.init(self.scope.conditions(table))
                    state.request()
                    state.ack()
            self._idl = idl
            try:
                self._run_until(idl.has_ever_connected, deadline,
                                lambda: self._unreachable(f"no reply within {self.timeout:g} s"))
            except AgentError:
                self.close()
                raise
            log.debug("connected to OVSDB at %s", self.remote)
        return self._idl

    def _rpc(self, method: str, params: list, deadline: float) -> Any:
        """One request on a short connection of its own: the server's schema (a hook must
        not trust a schema file on disk), or a read-only `select`."""
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
            request = ovs.jsonrpc.Message.create_request(method, params)
            if error := rpc.send(request):
                raise self._unreachable(os.strerror(error))
            while True:
                rpc.run()
                error, msg = rpc.recv()
                if error == errno.EAGAIN:
                    self._block(deadline, method, rpc.wait, rpc.recv_wait)
                elif error:
                    raise self._unreachable("connection closed" if error == ovs.jsonrpc.EOF else os.strerror(error))
                elif msg.id == request.id:
                    break
        finally:
            (rpc or stream).close()
        if msg.type == ovs.jsonrpc.Message.T_ERROR:
            raise OvsUnavailable(f"OVSDB at {self.remote} refused {method} ({msg.error})",
                                 "point --ovsdb at Open vSwitch's database socket")
        if method == "transact" and any("error" in result for result in msg.result if result):
            raise OvsUnavailable(f"OVSDB at {self.remote} refused a read: {msg.result}", UNREACHABLE_FIX)
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

    def _run_until(self, ready: Callable[[], bool], deadline: float, timeout: Callable[[], Exception]) -> None:
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
        """Until ovs-vswitchd has applied next_cfg `target`: a first window ending at
        `deadline`, then windows of `timeout` while its process keeps working, up to
        `busy_timeout` in all (a reconfiguration of thousands of ports on a loaded host,
        or a boot storm's queue of them, outlasts one window; a dead or stuck
        ovs-vswitchd does not get more)."""
        root = lambda: root_row(self._idl, self.remote)  # noqa: E731 - the row object changes on reconnect
        pidfile = vswitchd.pidfile_for(self.remote)
        started = time.monotonic()
        before = vswitchd.activity(pidfile)
        while True:
            try:
                self._run_until(lambda: root().cur_cfg >= target, deadline, _WindowOver)
                return
            except _WindowOver:
                now = vswitchd.activity(pidfile)
                waited = time.monotonic() - started
                why = verdict(before, now, waited, self.busy_timeout, str(pidfile))
                if why is not None:
                    raise AgentTimeout(f"ovs-vswitchd did not apply {what} within {waited:.0f} s "
                                       f"(cur_cfg {root().cur_cfg} < next_cfg {target}): {why}",
                                       VSWITCHD_LOG_FIX) from None
                log.info("ovs-vswitchd (pid %s) is still working after %.0f s: waiting on for %s", now and now.pid,
                         waited, what, extra={"result": "waiting"})
                before = now
                deadline = min(time.monotonic() + self.timeout, started + self.busy_timeout)


def _registered(schema: dict) -> dict:
    """The server's schema cut to the tables and columns the agent registers (those this
    server has): python-ovs parses a schema whole, and the rest of it is most of the work."""
    kept = {}
    for table, wanted in COLUMNS.items():
        if table in schema["tables"]:
            spec = schema["tables"][table]
            columns = {c: spec["columns"][c] for c in wanted if c in spec["columns"]}
            indexes = [i for i in spec.get("indexes", []) if set(i) <= set(columns)]
            kept[table] = {**spec, "columns": columns, "indexes": indexes}
    return {**schema, "tables": kept}


class _WindowOver(Exception):
    """One window of a wait for ovs-vswitchd ended (model/vswitchd decides what next)."""


def _steps(actions: Sequence[Action]) -> Iterator[tuple[list[Action], bool]]:
    """The plan cut after each barrier: (actions, whether the next step depends on them)."""
    step: list[Action] = []
    for action in actions:
        step.append(action)
        if action.barrier:
            yield step, True
            step = [action.add] if isinstance(action, ReplaceVhostPort) else []
    if step:
        yield step, False


def _chunks(actions: list[Action]) -> Iterator[list[Action]]:
    for first in range(0, len(actions), MAX_STEP_ACTIONS):
        yield actions[first:first + MAX_STEP_ACTIONS]


def _what(actions: Sequence[Action]) -> str:
    """A short name for a transaction (its OVSDB comment and error messages)."""
    what = ", ".join(f"{type(a).__name__} {_subject(a)}".rstrip() for a in actions[:3])
    return what + (f" and {len(actions) - 3} more" if len(actions) > 3 else "")


def _subject(action: Action) -> str:
    for field in ("port", "bridge", "limit", "datapath_type"):
        if hasattr(action, field):
            return str(getattr(action, field))
    return ""
