"""systemd/pve-vhost-agent.service: checked by systemd-analyze, and run by a real systemd.

The real run boots this machine's own root under systemd-nspawn (a throw-away /etc, the
host's /usr), with the unit file as shipped. Only what a test must change is changed: a
drop-in names the node and the test's OVSDB (the CLI reads PVE_VHOST_AGENT_NODE and
PVE_VHOST_AGENT_OVSDB), /usr/bin/pve-vhost-agent runs this checkout (an overlay on /usr/bin),
and /etc/pve is a test folder.
"""

from __future__ import annotations

import json
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


def test_the_unit_as_systemd_runs_it(workdir, fresh_ovs):
    ovs = fresh_ovs("h6svunit")
    pve = workdir / "pve"
    (pve / "nodes/pve1/qemu-server").mkdir(parents=True)
    (pve / "nodes/pve1/qemu-server/100.conf").write_text(
        "balloon: 0\nhookscript: local:snippets/pve-vhost-agent\nmemory: 2048\n")
    (pve / "pve-vhost-agent.cfg").write_text(f"vhostuser: 100-net1\n\tbridge h6svvh\n\tmac {MAC}\n\n")
    dropin = workdir / "dropin"
    dropin.mkdir()
    (dropin / "test.conf").write_text(
        "[Service]\nEnvironment=PVE_VHOST_AGENT_NODE=pve1 PVE_VHOST_AGENT_OVSDB=unix:/srv/h6sv-ovs/db.sock\n")
    machine = workdir.name.replace("_", "x")  # a machine name allows no "_"
    nspawn = subprocess.Popen(
        ["systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit", "--private-network",
         f"--machine={machine}", f"--bind={pve}:/etc/pve", f"--bind={ovs.run_dir}:/srv/h6sv-ovs",
         f"--overlay-ro=/usr/bin:{stub_bin(workdir, CONTAINER_REPO)}:/usr/bin",
             f"--bind-ro={REPO}:{CONTAINER_REPO}",
         f"--bind-ro={UNIT}:/etc/systemd/system/pve-vhost-agent.service",
         f"--bind-ro={dropin}:/etc/systemd/system/pve-vhost-agent.service.d",
         # The host's openvswitch-switch unit would start a second OVS inside the container.
         "--bind-ro=/dev/null:/etc/systemd/system/openvswitch-switch.service",
         # python-ovs's IDL asks libuuid for a uuid1, which tries uuidd's socket; the
         # container's uuidd cannot start (no uuidd user) and the client waits 5 s for it.
         "--bind-ro=/dev/null:/etc/systemd/system/uuidd.socket",
         "--boot", "systemd.firstboot=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        inside = Container(nspawn)
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


class Container:
    """Commands inside the booted container (as `machinectl shell` would, without machined)."""

    def __init__(self, nspawn: subprocess.Popen, timeout: float = 30):
        deadline = time.monotonic() + timeout
        self.init = None
        while self.init is None:
            children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            if pids:
                self.init = int(pids[0])
            elif nspawn.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"systemd-nspawn did not boot: {nspawn.stderr.read() if nspawn.poll() is not None else ''}")
            else:
                time.sleep(0.05)
        # systemd answers once it is up far enough to take jobs.
        while self.run("systemctl", "is-system-running").stdout.strip() in ("", "offline", "initializing"):
            if time.monotonic() > deadline:
                raise AssertionError("the container's systemd did not come up")
            time.sleep(0.1)

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.init), "-m", "-u", "-i", "-n", "-p", *argv],
                              capture_output=True, text=True, timeout=60)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("systemctl", *args)
