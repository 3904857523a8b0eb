"""systemd/pve-vhost-agent.service: checked by systemd-analyze, and run by a real systemd.

The real run boots this machine's own root under systemd-nspawn (a throw-away /etc, the
host's /usr), with the unit file as shipped. Only what a test must change is changed: a
drop-in names the node and the test's OVSDB (the CLI reads PVE_VHOST_AGENT_NODE and
PVE_VHOST_AGENT_OVSDB; one test shortens WatchdogSec=), /usr/bin/pve-vhost-agent runs this
checkout (an overlay on /usr/bin), and /etc/pve is a test folder (none: plain Debian).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO
from fixtures.mountns import private_mounts

PREFIX = "h6sv"
UNIT = REPO / "systemd" / "pve-vhost-agent.service"
EXEC = "/usr/bin/pve-vhost-agent"
MAC = "02:00:00:00:01:01"


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-unit-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# Where the container sees the checkout: not under /tmp, which the container's own
# systemd mounts a fresh tmpfs over (a checkout under /tmp would vanish from its view).
CONTAINER_REPO = "/srv/pve-vhost-agent-src"


def stub_bin(folder: Path, repo: str = str(REPO)) -> Path:
    """A folder with /usr/bin/pve-vhost-agent as the package installs it, running this checkout."""
    bindir = folder / "bin"
    bindir.mkdir()
    exe = bindir / "pve-vhost-agent"
    exe.write_text(f"#!/usr/bin/python3\nimport sys\nsys.path.insert(0, {repo!r})\n"
                   "from pve_vhost_agent.cli.main import run\nrun()\n")
    exe.chmod(0o755)
    return bindir


def verify(unit: Path, bindir: Path) -> subprocess.CompletedProcess:
    # systemd-analyze writes under /run/systemd: a private mount namespace keeps that away
    # from the host; the overlay adds the (not installed) executable. Man pages come with
    # the package, so their check is off.
    mounts = [["-t", "tmpfs", "tmpfs", "/run/systemd"],
              ["-t", "overlay", "overlay", "-o", f"lowerdir={bindir}:/usr/bin", "/usr/bin"]]
    return subprocess.run(private_mounts(mounts, ["systemd-analyze", "verify", "--man=no", str(unit)]),
                          capture_output=True, text=True, timeout=60)


def test_systemd_analyze_finds_nothing_to_complain_about(workdir):
    bindir = stub_bin(workdir)
    result = verify(UNIT, bindir)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The same check on a broken copy does complain: its silence above means something.
    broken = workdir / "pve-vhost-agent.service"
    broken.write_text(UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes"))
    assert "Unknown key 'ProtectHomes' in section [Service]" in verify(broken, bindir).stderr


def test_the_units_exposure_stays_at_most_2_6_with_the_socket_families_it_needs_only(workdir):
    unit = workdir / "pve-vhost-agent.service"
    shutil.copy(UNIT, unit)
    mounts = [["-t", "tmpfs", "tmpfs", "/run/systemd"]]
    result = subprocess.run(private_mounts(mounts, ["systemd-analyze", "security", "--offline=true", str(unit)]),
                            capture_output=True, text=True, timeout=60)
    score = float(re.search(r"Overall exposure level for pve-vhost-agent.service: ([0-9.]+)", result.stdout).group(1))
    assert score <= 2.6, result.stdout
    # unix (OVSDB, journald, QMP), netlink (Linux-bridge QinQ, doctor), UDP (link ends): no other
    assert re.search(r"^RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6$", UNIT.read_text(), re.M)


def pve_folder(workdir: Path, mounted: bool = True) -> Path:
    """/etc/pve of node pve1 with VM 100 (the agent's hookscript, a vhost-user NIC declared)."""
    pve = workdir / "pve"
    (pve / "nodes/pve1/qemu-server").mkdir(parents=True)
    if mounted:
        (pve / ".version").write_text('{\n"starttime": 0\n}\n')  # what pmxcfs always serves
    (pve / "nodes/pve1/qemu-server/100.conf").write_text(
        "balloon: 0\nhookscript: local:snippets/pve-vhost-agent\nmemory: 2048\n")
    (pve / "pve-vhost-agent.cfg").write_text(f"vhostuser: 100-net1\n\tbridge h6svvh\n\tmac {MAC}\n\n")
    return pve


@contextlib.contextmanager
def container(workdir: Path, ovs, *, pve: Path | None, dropin: str = "", default: str | None = None):
    """The host's root booted under systemd-nspawn with the unit as shipped, /etc/pve bound
    from `pve` (None: none, as on plain Debian), a drop-in naming the node and the test's
    OVSDB (+ `dropin`), and /etc/default/pve-vhost-agent when `default` is given."""
    folder = workdir / "dropin"
    folder.mkdir()
    (folder / "test.conf").write_text(
        "[Service]\nEnvironment=PVE_VHOST_AGENT_NODE=pve1 PVE_VHOST_AGENT_OVSDB=unix:/srv/h6sv-ovs/db.sock\n" + dropin)
    binds = [f"--bind={pve}:/etc/pve"] if pve is not None else []
    if default is not None:
        (workdir / "default").write_text(default)
        binds.append(f"--bind-ro={workdir / 'default'}:/etc/default/pve-vhost-agent")
    machine = workdir.name.replace("_", "x")  # a machine name allows no "_"
    nspawn = subprocess.Popen(
        ["systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit", "--private-network",
         f"--machine={machine}", *binds, f"--bind={ovs.run_dir}:/srv/h6sv-ovs",
         f"--overlay-ro=/usr/bin:{stub_bin(workdir, CONTAINER_REPO)}:/usr/bin",
         f"--bind-ro={REPO}:{CONTAINER_REPO}",
         f"--bind-ro={UNIT}:/etc/systemd/system/pve-vhost-agent.service",
         f"--bind-ro={folder}:/etc/systemd/system/pve-vhost-agent.service.d",
         # The host's openvswitch-switch unit would start a second OVS inside the container.
         "--bind-ro=/dev/null:/etc/systemd/system/openvswitch-switch.service",
         # python-ovs's IDL asks libuuid for a uuid1, which tries uuidd's socket; the
         # container's uuidd cannot start (no uuidd user) and the client waits 5 s for it.
         "--bind-ro=/dev/null:/etc/systemd/system/uuidd.socket",
         "--boot", "systemd.firstboot=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield Container(nspawn)
    finally:
        nspawn.send_signal(signal.SIGTERM)  # an orderly shutdown of the container
        try:
            nspawn.wait(timeout=20)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait()
        leftover = Path("/run/systemd/nspawn/propagate") / machine
        if leftover.is_dir():
            leftover.rmdir()


def test_the_unit_as_systemd_runs_it(workdir, fresh_ovs):
    ovs = fresh_ovs("h6svunit")
    pve = pve_folder(workdir)
    with container(workdir, ovs, pve=pve) as inside:
        started = inside.systemctl("start", "pve-vhost-agent")  # Type=notify: returns after READY=1
        assert started.returncode == 0, inside.systemctl("status", "pve-vhost-agent").stdout
        status = inside.systemctl("status", "pve-vhost-agent", "--no-pager").stdout
        assert "Active: active (running)" in status
        # The doctor sees a plain (not DPDK) OVS for a declared vhost-user NIC: two errors.
        assert ('Status: "1 VM (0 running): 0 vhost-user ports (0 connected), 0 QinQ taps; last pass ' in status
                and ' ok; 0 problems; doctor: 2 errors (pve-vhost-agent doctor)"' in status), status
        # The first pass wrote the stopped VM's args, logged with structured journal fields.
        assert "memory-backend-memfd,id=vhu-mem,size=2048M" in (pve / "nodes/pve1/qemu-server/100.conf").read_text()
        entries = [json.loads(line) for line in inside.run(
            "journalctl", "SYSLOG_IDENTIFIER=pve-vhost-agent", "ACTION=WriteVmArgs", "-o", "json").stdout.splitlines()]
        timed = [e for e in entries if "DURATION_MS" in e]  # the service's own entry (apply_vm_args logs one too)
        assert [(e["VMID"], e["RESULT"], e["PRIORITY"]) for e in timed] == [("100", "changed", "6")]
        doctor = [json.loads(line) for line in inside.run(
            "journalctl", "SYSLOG_IDENTIFIER=pve-vhost-agent", "RESULT=doctor", "SEVERITY=error", "-o", "json"
        ).stdout.splitlines()]
        assert sorted(e["CHECK"] for e in doctor) == ["dpdk-binary", "dpdk-init"]  # logged once, with its fields
        assert inside.systemctl("stop", "pve-vhost-agent").returncode == 0
        shown = inside.systemctl("show", "pve-vhost-agent", "-p", "Result", "-p", "ExecMainStatus").stdout
        assert shown.split() == ["Result=success", "ExecMainStatus=0"]


def test_on_plain_debian_the_unit_does_not_run(workdir, fresh_ovs):
    ovs = fresh_ovs("h6svplain")
    with container(workdir, ovs, pve=None) as inside:
        assert inside.systemctl("start", "pve-vhost-agent").returncode == 0  # a condition, not a failure
        shown = inside.systemctl("show", "pve-vhost-agent", "-p", "ActiveState", "-p", "ConditionResult").stdout
        assert sorted(shown.split()) == ["ActiveState=inactive", "ConditionResult=no"]


def test_reload_sighup_any_unasked_exit_and_a_hung_pass_are_handled(workdir, fresh_ovs):
    """`systemctl reload` and a bare SIGHUP run a pass at once (the interval, from
    /etc/default/pve-vhost-agent, is an hour); a SIGTERM systemd did not send brings the
    service back; a FIFO where a VM config should be is that VM's problem, not a hang (the
    agent opens /etc/pve's files non-blocking and reads regular files only); a pass that
    hangs (a stopped process stands in for one stuck in the kernel, e.g. in a hung pmxcfs)
    is caught by the watchdog (shortened here) and the service restarted."""
    ovs = fresh_ovs("h6svwd")
    pve = pve_folder(workdir)
    conf = pve / "nodes/pve1/qemu-server/100.conf"
    # WatchdogSec shortened to 15 s (a normal pass on a loaded machine still fits in it).
    with container(workdir, ovs, pve=pve, dropin="WatchdogSec=15s\nRestartSec=1s\n",
                   default="PVE_VHOST_AGENT_INTERVAL=3600\n") as inside:
        assert inside.systemctl("start", "pve-vhost-agent").returncode == 0
        wait_for(lambda: "size=2048M" in conf.read_text(), "the first pass's args")
        first = inside.show("MainPID")

        conf.write_text(conf.read_text().replace("memory: 2048", "memory: 4096"))
        assert inside.systemctl("reload", "pve-vhost-agent").returncode == 0
        wait_for(lambda: "size=4096M" in conf.read_text(), "a pass right after `systemctl reload`")
        conf.write_text(conf.read_text().replace("memory: 4096", "memory: 1024"))
        # --kill-whom=main: the service's own process (not a reload's kill still in the cgroup).
        assert inside.systemctl("kill", "--kill-whom=main", "-s", "HUP", "pve-vhost-agent").returncode == 0
        wait_for(lambda: "size=1024M" in conf.read_text(), "a pass right after SIGHUP")
        assert (inside.show("ActiveState"), inside.show("MainPID"), inside.show("NRestarts")) == ("active", first, "0")

        assert inside.systemctl("kill", "--kill-whom=main", "-s", "TERM", "pve-vhost-agent").returncode == 0
        wait_for(lambda: inside.show("NRestarts") == "1" and inside.show("ActiveState") == "active",
                 "a restart after a SIGTERM systemd did not send")
        assert inside.show("MainPID") != first

        os.mkfifo(pve / "nodes/pve1/qemu-server/101.conf")
        assert inside.systemctl("reload", "pve-vhost-agent").returncode == 0
        wait_for(lambda: "101.conf is not a regular file" in inside.show("StatusText"), "VM 101's problem in status")
        assert (inside.show("ActiveState"), inside.show("NRestarts")) == ("active", "1")
        (pve / "nodes/pve1/qemu-server/101.conf").unlink()

        second = inside.show("MainPID")
        assert inside.systemctl("kill", "--kill-whom=main", "-s", "STOP", "pve-vhost-agent").returncode == 0
        wait_for(lambda: int(inside.show("NRestarts")) >= 2, "the watchdog's restart of a hung service", timeout=60)
        log = inside.run("journalctl", "-u", "pve-vhost-agent", "--no-pager").stdout
        assert "Watchdog timeout" in log, log[-3000:]
        assert inside.show("MainPID") != second
        wait_for(lambda: inside.show("ActiveState") == "active" and " ok; 0 problems" in inside.show("StatusText"),
                 "the service back to normal", timeout=60)


def wait_for(condition, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.1)


class Container:
    """Commands inside the booted container (as `machinectl shell` would, without machined)."""

    def __init__(self, nspawn: subprocess.Popen, timeout: float = 90):  # a loaded 2-core machine boots slowly
        deadline = time.monotonic() + timeout
        self.nspawn = nspawn
        self.init = self._init_pid()
        # systemd answers once it is up far enough to take jobs.
        while self.run("systemctl", "is-system-running").stdout.strip() in ("", "offline", "initializing"):
            if nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn ended ({nspawn.returncode}): {nspawn.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("the container's systemd did not come up")
            time.sleep(0.1)
            self.init = self._init_pid()

    def _init_pid(self) -> int | None:
        """The container's PID 1 as the host sees it (None until there is one): nspawn's child in
        a new PID namespace (its first child may be a short-lived set-up helper that exits)."""
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        pids = children.read_text().split() if children.exists() else []
        inits = [int(pid) for pid in pids if _own_pid_namespace(int(pid))]
        if not inits and self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn did not boot: {self.nspawn.stderr.read()}")
        return inits[0] if inits else None

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        if self.init is None:
            return subprocess.CompletedProcess(argv, 1, "", "no container init yet")
        return subprocess.run(["nsenter", "-t", str(self.init), "-m", "-u", "-i", "-n", "-p", *argv],
                              capture_output=True, text=True, timeout=60)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("systemctl", *args)

    def show(self, prop: str) -> str:
        """One property of the unit, e.g. show("NRestarts") -> "0"."""
        return self.systemctl("show", "pve-vhost-agent", "-p", prop, "--value").stdout.strip()


def _own_pid_namespace(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    except FileNotFoundError:
        return False  # gone already
