"""The service (`pve-vhost-agent service`, unit pve-vhost-agent.service): an edge and its loop.

Each pass observes this node (nodestate), plans (reconcile.plan_node), applies each action
on its own and tells systemd a one-line status (nodestatus). One VM's error is logged and
reported; the others go on. It wakes every `interval` seconds, early when OVSDB changes
(Proxmox re-plugging a tap port), and at once on SIGHUP (`systemctl reload`). SIGTERM or
SIGINT ends it after the current action, with exit code 0. Under systemd's watchdog
(WatchdogSec=) it says WATCHDOG=1 between the steps of a pass and while it waits, so a
pass that hangs (a stuck /etc/pve read, say) gets the service killed and restarted.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import select
import signal
import sys
import time
from typing import Callable

from systemd import daemon

from pve_vhost_agent.errors import AgentError, ExitCode, OvsUnavailable, Unexpected
from pve_vhost_agent.adapters.journal import setup_logging
from pve_vhost_agent.adapters.specstore import migrate_spec
from pve_vhost_agent.flows.observe import Caches, observe_node, observe_ovs
from pve_vhost_agent.plan.status import node_summary, status_line
from pve_vhost_agent.adapters.ovsdb import UNREACHABLE_FIX, Ovsdb, Scope
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.flows.apply import apply_plan
from pve_vhost_agent.model.actions import OVS, Action, WriteVmArgs
from pve_vhost_agent.plan.node import NodePlan, plan_node
from pve_vhost_agent.plan.observed import NodeState, Problem
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import ClusterSpec
from pve_vhost_agent.flows.vmargs import apply_vm_args
from pve_vhost_agent.adapters.vmstore import vm_busy
from pve_vhost_agent.flows.doctor import DoctorWatch, doctor_errors

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 10.0
SETTLE = 0.3  # after an OVSDB change, let the rest of a burst (del-port, add-port) arrive
MIN_GAP = 1.0  # at least this long from the end of a pass to one woken by changes
OVS_RETRY = 5.0  # while OVS is unreachable, try again at least this often
# A busy VM with work waiting (say `qm set` re-plugging a tap under the VM lock): the
# OVSDB changes came while it was locked, and nothing else will wake the service.
BUSY_RETRY = 2.0


@dataclasses.dataclass(frozen=True)
class PassReport:
    """The node after a pass: what is left to do and what went wrong."""

    state: NodeState
    plan: NodePlan  # planned again after applying: normally nothing is left
    failures: tuple[Problem, ...]
    when: datetime.datetime
    doctor_errors: int = 0  # error-level findings of `pve-vhost-agent doctor` (flows/doctor.py)

    @property
    def problems(self) -> tuple[Problem, ...]:
        return self.plan.problems + self.failures

    def summary(self) -> dict:
        return {**node_summary(self.state, self.plan, self.failures), "doctor_errors": self.doctor_errors}

    def line(self, label: str = "last pass") -> str:
        line = status_line(self.summary(), self.when, label)
        if self.doctor_errors:
            line += f"; doctor: {self.doctor_errors} error{'s' if self.doctor_errors != 1 else ''} (pve-vhost-agent doctor)"
        return line

    @property
    def exit_code(self) -> int:
        codes = {p.exit_code for p in self.problems}
        if not codes:
            return int(ExitCode.OK)
        return codes.pop() if len(codes) == 1 else int(ExitCode.FAILURE)


class Service:
    """Observe, plan and apply for one node, over one lazily opened OVSDB connection."""

    def __init__(self, settings: Settings, stopping: Callable[[], bool] = lambda: False,
                 alive: Callable[[], None] = lambda: None):
        self.settings = settings
        self.stopping = stopping
        self.alive = alive  # called between the steps of a pass: systemd's watchdog sees progress
        self._db: Ovsdb | None = None
        self._seqno = 0  # the OVSDB version of the last observation
        self._deferred: tuple[int, ...] = ()  # busy VMs with work waiting, from the last pass
        self._reported: dict[tuple[int | None, str], Problem] = {}  # identity -> as first logged
        self._told_later: set[str] = set()
        self._caches = Caches()  # parsed files kept while they do not change
        self._last: tuple[NodeState, NodePlan] | None = None  # a plan stays valid while its state does
        self._doctor = DoctorWatch()  # the host network doctor, run again only when something changed

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def observe(self, remember: bool = True) -> NodeState:
        return observe_node(self.settings, self._read_ovs, self._caches, remember)

    def _read_ovs(self, scope: Scope) -> tuple[OvsState | None, Problem | None]:
        if self._db is None:
            self._db = Ovsdb.from_settings(self.settings, scope)
        ovs, problem = observe_ovs(self._db, scope)
        if problem is None:
            self._seqno = self._db.change_seqno
        else:
            self.close()  # the next observation connects anew
        return ovs, problem

    def plan(self, state: NodeState) -> NodePlan:
        """The plan for `state`; a pass that finds the node as the last one left it plans
        nothing anew (a no-op pass then costs the observation only)."""
        if self._last is None or self._last[0] != state:
            self._last = (state, plan_node(state))
        return self._last[1]

    def check(self) -> PassReport:
        """Observe and plan, apply nothing (`status`, `--dry-run`)."""
        state = self.observe(remember=False)
        return PassReport(state, self.plan(state), (), _now(), doctor_errors(self.settings, state))

    def run_pass(self) -> PassReport:
        when = _now()
        state = self.observe()
        self.alive()
        plan = self.plan(state)
        failures = self._apply(plan, state) if plan.actions else []
        if plan.actions:  # report the node as it is now
            state = self.observe()
            plan = self.plan(state)
        report = PassReport(state, plan, tuple(failures), when, self._doctor.update(self.settings, state))
        self._log_problems(report.problems)
        for note in sorted(set(plan.at_next_start) - self._told_later):
            log.info("%s", note, extra={"result": "at next start"})
        self._told_later = set(plan.at_next_start)
        self._deferred = plan.deferred
        return report

    def wait(self, interval: float, wake_fd: int | None = None) -> bool:
        """Until `interval` s have passed, OVSDB changed (then a short settle), or `wake_fd`
        is readable. True when the next pass is due now: OVSDB changed, a busy VM or an
        unreachable OVS is to be looked at again (False: only `interval` passed, or `wake_fd`)."""
        started = time.monotonic()
        fds = [wake_fd] if wake_fd is not None else []
        if self._db is None:
            select.select(fds, [], [], min(interval, OVS_RETRY))
            return True
        retry = bool(self._deferred) and interval >= BUSY_RETRY
        if retry:
            log.debug("VMs %s are busy with work waiting: next pass in %g s", self._deferred, BUSY_RETRY)
            interval = BUSY_RETRY
        if self._db.wait_for_change(self._seqno, interval, fds):
            log.debug("OVSDB changed: next pass early")
            select.select(fds, [], [], max(SETTLE, started + MIN_GAP - time.monotonic()))
            return True
        return retry and time.monotonic() - started >= BUSY_RETRY

    # --- applying ----------------------------------------------------------------------

    def _apply(self, plan: NodePlan, state: NodeState) -> list[Problem]:
        """Args first (one VM at a time: each is its own file), then every VM's port changes
        together (a few transactions, one wait for ovs-vswitchd). When a batch fails, it is
        tried again in halves, down to single VMs, so one VM's problem stays that VM's (and
        costs a few transactions, not one per VM)."""
        failures: list[Problem] = []
        args = [a for a in plan.actions if isinstance(a, WriteVmArgs)]
        rest = [a for a in plan.actions if not isinstance(a, WriteVmArgs)]
        for action in args:
            if self.stopping():
                return failures
            failures += self._apply_part([action], plan, state)
        if rest and not self.stopping():
            failure = self._apply_part(rest, plan, state)
            if failure and len({getattr(a, "vmid", None) for a in rest}) > 1:
                failures = failures + self._apply_halves(_by_vm(rest), plan, state)
            else:
                failures += failure
        return failures

    def _apply_halves(self, parts: list[list[Action]], plan: NodePlan, state: NodeState) -> list[Problem]:
        """VMs' parts of a batch that failed: each half in one go, a half that fails again
        split further; a single VM's failure is its own."""
        if len(parts) == 1:
            return self._apply_part(parts[0], plan, state)
        failures: list[Problem] = []
        middle = len(parts) // 2
        for half in (parts[:middle], parts[middle:]):
            if len(half) == 1 or self._apply_part(_joined(half), plan, state):
                failures += self._apply_halves(half, plan, state)
        return failures

    def _apply_part(self, actions: list[Action], plan: NodePlan, state: NodeState) -> list[Problem]:
        self.alive()
        vmids = sorted({a.vmid for a in actions if getattr(a, "vmid", None) is not None})
        try:
            if self._db is None and any(a.target == OVS for a in actions):
                raise OvsUnavailable(f"no connection to OVSDB at {self.settings.ovsdb}", UNREACHABLE_FIX)
            # Never wait for a VM's lock: whoever holds it is changing the VM; look next pass.
            # Nor for ovs-vswitchd to take the last step: nothing here depends on it (a
            # start's QEMU does, the hook waits for that), and the next pass observes anew;
            # an OVS-DPDK creating thousands of ports takes minutes.
            fast = dataclasses.replace(self.settings, lock_timeout=0)
            apply_plan(fast, actions, log, db=self._db, guards=plan.guards, wait=False,
                       write_args=lambda action: self._write_args(action, state.spec))
        except AgentError as err:
            return [Problem.of(err, vmids[0] if len(vmids) == 1 else None)]
        except Exception as err:  # a bug must not stop the other VMs' work
            log.exception("applying %s failed unexpectedly", ", ".join(a.sentence() for a in actions[:3]),
                          extra={"result": "failed"})
            return [Problem.of(Unexpected.of(err, " (the traceback is in the journal)"), vmids[0] if len(vmids) == 1 else None)]
        return []

    def _write_args(self, action: WriteVmArgs, spec: ClusterSpec | None) -> str:
        # Never wait for a VM's lock: whoever holds it is changing the VM; look next pass.
        if vm_busy(self.settings, action.vmid):
            return "skipped: the VM is busy"
        # Takes the VM lock and plans again under it, exactly as `apply` does.
        result = apply_vm_args(self.settings, action.vmid, spec)
        return "unchanged" if result.sync.in_sync else "changed"

    def _log_problems(self, problems: tuple[Problem, ...]) -> None:
        """Each problem once when it appears and once when it is gone, not every pass. A
        problem whose words change while it lasts (OVSDB "lost", then "cannot reach") is
        the same problem: its end is logged only when it has ended."""
        now = {p.identity: p for p in problems}
        for identity, problem in now.items():
            if identity not in self._reported:
                log.warning("%s", problem, extra={"vmid": problem.vmid, "result": "problem"})
        for identity in sorted(set(self._reported) - set(now), key=str):
            gone = self._reported[identity]
            log.info("resolved: %s", gone, extra={"vmid": gone.vmid, "result": "resolved"})
        self._reported = {**now, **{i: self._reported[i] for i in now if i in self._reported}}


def _by_vm(actions: list[Action]) -> list[list[Action]]:
    """Each VM's actions on their own, with the node-wide ones (vlan-limit, datapath) that
    come before them in the plan."""
    parts: dict[int, list[Action]] = {}
    node_wide: list[Action] = []
    for action in actions:
        vmid = getattr(action, "vmid", None)
        if vmid is None:
            node_wide.append(action)
        else:
            parts.setdefault(vmid, list(node_wide)).append(action)
    return [parts[vmid] for vmid in sorted(parts)]


def _joined(parts: list[list[Action]]) -> list[Action]:
    """Several VMs' parts (from `_by_vm`) as one, each node-wide action once."""
    joined: list[Action] = []
    for part in parts:
        joined += [a for a in part if getattr(a, "vmid", None) is not None or a not in joined]
    return joined


def _now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


# --- the loop -------------------------------------------------------------------------


class Signals:
    """SIGTERM/SIGINT set `stop`, SIGHUP sets `reload` (`systemctl reload`: a pass now);
    each wakes any wait through a pipe, instead of raising."""

    STOP = (signal.SIGTERM, signal.SIGINT)
    RELOAD = signal.SIGHUP

    def __init__(self) -> None:
        self.stop = False
        self.reload = False
        self.fd = -1
        self._write_fd = -1
        self._previous: dict = {}
        self._previous_wakeup = -1

    def __enter__(self) -> "Signals":
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (*self.STOP, self.RELOAD)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_wakeup)
        os.close(self.fd)
        os.close(self._write_fd)

    def _handle(self, signum: int, _frame: object) -> None:
        if signum == self.RELOAD:
            log.info("SIGHUP received: a pass now")
            self.reload = True
        else:
            log.info("%s received: stopping after the current step", signal.Signals(signum).name)
            self.stop = True

    def take_reload(self) -> bool:
        """Whether SIGHUP came since the last call; empties the wake-up pipe."""
        try:
            while os.read(self.fd, 64):
                pass
        except BlockingIOError:
            pass
        asked, self.reload = self.reload, False
        return asked


def watchdog_period(environ: dict | None = None) -> float | None:
    """How often to tell systemd's watchdog that the loop is alive (half of WatchdogSec=),
    or None without a watchdog (sd_watchdog_enabled: WATCHDOG_USEC, for this PID)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid = int(env.get("WATCHDOG_PID", os.getpid()))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 and pid == os.getpid() else None


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to journald (JOURNAL_STREAM=<dev>:<inode>)."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def run_service(settings: Settings, interval: float, once: bool,
                echo: Callable[[str], None] = lambda line: None) -> int:
    """Run passes until SIGTERM (exit 0), or one pass with `once` (non-zero on problems)."""
    # Under systemd stderr already goes to the journal: structured entries only, no copies.
    setup_logging(journal=True, human_stream=None if stderr_is_journal() else sys.stderr)
    log.info("starting: node %s, OVSDB %s, a pass every %g s and on OVSDB changes",
             settings.node, settings.ovsdb, interval)
    try:
        migrate_spec(settings)  # after an upgrade from a single spec file: once, on whichever node is first
    except AgentError as err:
        log.warning("the old spec file was not split into per-VM files: %s", err, extra={"result": "problem"})
    ping_every = watchdog_period()
    alive = (lambda: daemon.notify("WATCHDOG=1")) if ping_every else (lambda: None)
    with Signals() as signals, Service(settings, lambda: signals.stop, alive) as service:
        ready = False
        while not signals.stop:
            signals.take_reload()  # a SIGHUP during a pass is served by that pass
            try:
                report = service.run_pass()
                line = report.line()
            except Exception as err:  # noqa: BLE001 - the service must outlive a bad pass
                log.exception("pass failed: %s", err, extra={"result": "failed"})
                report, line = None, f"last pass {_now():%H:%M:%S} failed: {err}"
            daemon.notify(("" if ready else "READY=1\n") + f"STATUS={line}" + ("\nWATCHDOG=1" if ping_every else ""))
            ready = True
            if once:
                echo(line)
                return report.exit_code if report else int(ExitCode.FAILURE)
            log.debug("%s", line)
            _wait_for_next_pass(service, signals, interval, ping_every, alive)
    daemon.notify("STOPPING=1")
    log.info("stopped")
    return int(ExitCode.OK)


def _wait_for_next_pass(service: Service, signals: Signals, interval: float, ping_every: float | None,
                        alive: Callable[[], None]) -> None:
    """Until `interval` passed, OVSDB changed, a retry is due, SIGHUP or SIGTERM came;
    telling the watchdog every `ping_every` s meanwhile."""
    deadline = time.monotonic() + interval
    while not signals.stop:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        due = service.wait(min(left, ping_every) if ping_every else left, signals.fd)
        alive()
        if due or signals.take_reload():
            return
