"""The service for real: a private OVS-DPDK, a Proxmox-like root, the CLI as separate processes.

What no hook covers, one scenario each: args gone stale after a memory change, a tap
re-plugged by Proxmox (QinQ lost), ports and sockets left after a migration or a failed
start, Open vSwitch going away; and the process itself: READY=1 and STATUS= to systemd,
SIGTERM ends it with 0.

The node's OVS is private to this module: the service collects every owned port of a VM
that does not run here, so it must not share a switch with other tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fixtures.ovs import _alive, run, start_ovs
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.flows.service import Service
from pve_vhost_agent.model.actions import AddVhostPort
from pve_vhost_agent.model.ovs import PortVlan
from pve_vhost_agent.plan.node import NodePlan
from pve_vhost_agent.plan.ovs import plan_vhost_ports
from pve_vhost_agent.model.spec import EtherType, QinQ, TapQinQ, VhostNic, VlanPolicy, VmSpec
from pve_vhost_agent.adapters.specstore import load_spec, update_spec
from pve_vhost_agent.flows.vmargs import apply_vm_args
from pve_vhost_agent.formats.vmconfig import VmConfig

from fixtures.fakeqemu import start_fake_qemu
from conftest import REPO

PREFIX = "h6sv"
VHOST_BRIDGE = f"{PREFIX}vh"  # the agent's vhost-user bridge (it creates it)
PVE_BRIDGE = f"{PREFIX}br"  # stands in for Proxmox's vmbr0 on OVS
HOOK = "hookscript: local:snippets/pve-vhost-agent\n"
ROUTER = "boot: order=scsi0\nballoon: 0\ncores: 2\nmemory: 4096\nname: router\nostype: l26\n"
WAIT = 8.0  # bound for what must happen within one pass, with --interval far longer


@pytest.fixture(scope="module")
def node_ovs():
    inst = start_ovs(PREFIX, dpdk=True, other_config={"vlan-limit": "2"})
    yield inst
    inst.stop()


@pytest.fixture
def node(node_ovs, pve_root):
    """This node: the Proxmox-like root and the private OVS, emptied again after the test."""
    started: list[subprocess.Popen] = []
    yield Node(pve_root, node_ovs, started)
    for proc in started:
        stop(proc)
    for bridge in (VHOST_BRIDGE, PVE_BRIDGE):
        node_ovs.vsctl("--if-exists", "del-br", bridge)
    for port in node_ovs.find("Port", "external_ids:pve-vhost-agent\\:owner=port"):
        node_ovs.vsctl("--if-exists", "del-port", port)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


class Node:
    def __init__(self, root, ovs, started):
        self.root, self.ovs, self.started = root, ovs, started
        self.settings = root.settings(ovsdb=ovs.remote)

    def argv(self, *args: str, ovsdb: str | None = None) -> list[str]:
        return ["/usr/bin/python3", "-m", "pve_vhost_agent", "--root", str(self.root.root), "--node", self.root.node,
                "--ovsdb", ovsdb or self.ovs.remote, *args]

    def cli(self, *args: str, ovsdb: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args, ovsdb=ovsdb), cwd=REPO, capture_output=True, text=True, timeout=60)

    def start_service(self, notify: "NotifySocket", *args: str, ovsdb: str | None = None) -> subprocess.Popen:
        env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
        proc = subprocess.Popen(self.argv("service", *args, ovsdb=ovsdb), cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started.append(proc)
        return proc

    def vm(self, vmid: int, body: str, *entries, node: str | None = None, enabled: bool = True) -> None:
        self.root.write_vm(vmid, body + (HOOK if enabled else ""), node=node)
        for entry in entries:
            update_spec(self.settings, lambda spec, entry=entry: spec.with_entry(entry))

    def args(self, vmid: int) -> str:
        return VmConfig.parse(self.root.vm_path(vmid).read_text()).section("main").get("args", "")

    def make_ports(self, vmid: int) -> None:
        """What pre-start does for the VM's vhost-user NICs."""
        spec = VmSpec(vmid, load_spec(self.settings).for_vm(vmid).nics)
        with Ovsdb(self.ovs.remote, timeout=10) as db:
            db.apply(plan_vhost_ports(spec, db.snapshot(), self.settings.socket_dir("ovs")))

    def leave_socket(self, backend: str, name: str) -> Path:
        """A socket file as QEMU leaves it when it dies without cleaning up."""
        path = self.settings.socket_dir(backend) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(path))
        return path

    def port_vlan(self, port: str) -> dict:
        return self.ovs.get("Port", port, "vlan_mode", "tag", "cvlans", "other_config", "external_ids")

    def ports(self) -> list[str]:
        return self.ovs.find("Port", f"name!={VHOST_BRIDGE}", f"name!={PVE_BRIDGE}")

    @contextlib.contextmanager
    def running(self, vmid: int):
        """A stand-in QEMU: a pidfile naming a live process (killed by PID afterwards)."""
        pidfile = self.settings.qemu_pidfile(vmid)
        sleeper = start_fake_qemu(pidfile)
        try:
            yield sleeper
        finally:
            sleeper.kill()
            sleeper.wait()
            pidfile.unlink(missing_ok=True)

    @contextlib.contextmanager
    def vm_locked(self, vmid: int):
        """Hold Proxmox's VM lock, as `qm start`, `qm set` or a migration does."""
        path = self.settings.vm_lock(vmid)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class NotifySocket:
    """What systemd listens on for sd_notify: a unix datagram socket (NOTIFY_SOCKET)."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-notify-", dir="/tmp"))
        self.path = self.folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.received: list[tuple[str, str]] = []  # KEY=value items, in the order sent

    def wait_for(self, key: str, match: str = "", timeout: float = WAIT) -> str:
        """The first `key` (after those taken before) whose value contains `match`."""
        deadline = time.monotonic() + timeout
        while True:
            while self.received:
                name, value = self.received.pop(0)
                if name == key and match in value:
                    return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}= containing {match!r} within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536).decode()
            except socket.timeout:
                continue
            self.received += [tuple(line.split("=", 1)) for line in data.splitlines() if "=" in line]

    def next_pass(self) -> str:
        """STATUS= of a pass that began after this call (the one under way may not have seen
        what changed just before)."""
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while self.sock.recv(65536):
                pass
        self.sock.setblocking(True)
        self.received.clear()
        self.wait_for("STATUS")
        return self.wait_for("STATUS")

    def close(self):
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.folder.rmdir()


@pytest.fixture
def notify():
    sock = NotifySocket()
    yield sock
    sock.close()


def poll(check, timeout: float = WAIT, every: float = 0.05):
    """Seconds until `check()` is true (fails after `timeout`)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout} s: {check.__doc__ or check}")
        time.sleep(every)
    return time.monotonic() - start


# --- (a) args -----------------------------------------------------------------------------


def test_args_of_a_stopped_vm_follow_a_memory_change_in_one_pass(node):
    node.vm(100, ROUTER, VhostNic(100, 1, VHOST_BRIDGE, "02:00:00:00:01:01"))
    apply_vm_args(node.settings, 100)
    assert "size=4096M" in node.args(100)
    before = node.root.vm_path(100).read_text()
    # `qm set 100 --memory 8192` on the stopped VM: the backend size goes stale, no hook runs.
    node.root.vm_path(100).write_text(before.replace("memory: 4096", "memory: 8192"))

    result = node.cli("service", "--once")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"1 VM \(0 running\): 0 vhost-user ports \(0 connected\), 0 QinQ taps; "
                        r"last pass \d\d:\d\d:\d\d ok; 0 problems\n", result.stdout)
    assert "write VM 100's args line: memory changed from 4096 to 8192 MiB since the args were written\n" in result.stderr
    after = node.root.vm_path(100).read_text()
    assert "size=8192M" in node.args(100)
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert sorted(a.split(":")[0] for a, _ in changed) == ["args", "memory"]

    again = node.cli("service", "--dry-run")
    assert again.returncode == 0 and "would:" not in again.stdout, again.stdout
    assert node.root.vm_path(100).read_text() == after


# --- (b) a re-plugged tap, and waking up on OVSDB changes -------------------------------------------


def plug_tap(node, tag: int) -> None:
    """pve-bridge's plug of net0 with tag=N into an OVS bridge (the tap device stays)."""
    node.ovs.vsctl("--", "--if-exists", "del-port", "tap100i0", "--", "add-port", PVE_BRIDGE, "tap100i0", f"tag={tag}")


def tunnelled(node) -> bool:
    """tap100i0 is the agent's dot1q-tunnel port again"""
    return node.port_vlan("tap100i0")["vlan_mode"] == "dot1q-tunnel"


def test_a_re_plugged_tap_gets_qinq_back_at_once_and_a_busy_vm_waits(node, notify):
    node.ovs.vsctl("add-br", PVE_BRIDGE, "--", "set", "Bridge", PVE_BRIDGE, "datapath_type=netdev")
    node.ovs.ip("tuntap", "add", "dev", "tap100i0", "mode", "tap")
    plug_tap(node, 20)
    node.vm(100, ROUTER + f"net0: virtio=BC:24:11:00:00:01,bridge={PVE_BRIDGE},tag=20\n",
            TapQinQ(100, 0, QinQ(950, (10, 11), EtherType.DOT1Q)))
    with node.running(100):
        service = node.start_service(notify, "--interval", "600")
        notify.wait_for("READY", "1")
        # The first pass did what post-start does.
        assert node.port_vlan("tap100i0") == {
            "vlan_mode": "dot1q-tunnel", "tag": 950, "cvlans": [10, 11], "other_config": {"qinq-ethtype": "802.1q"},
            "external_ids": {"pve-vhost-agent:owner": "vlan", "pve-vhost-agent:vmid": "100", "pve-vhost-agent:nic": "net0",
                             "pve-vhost-agent:saved-vlan": '{"cvlans":[],"mode":"","qinq_ethtype":"","tag":20,"trunks":[]}'}}

        # `qm set 100 --net0 ...,tag=30` on the running VM: Proxmox re-plugs the tap, no hook runs.
        plug_tap(node, 20)
        assert not tunnelled(node)
        took = poll(lambda: tunnelled(node))
        assert took < WAIT  # with --interval 600: only the OVSDB change can have woken it

        # The same under the VM lock, in two steps, as `qm set` really does it: the service
        # leaves the busy VM alone and looks again soon after the lock is released.
        with node.vm_locked(100):
            node.ovs.vsctl("del-port", "tap100i0")
            # The tap missing in the middle of the re-plug is no problem: the VM is busy.
            assert notify.wait_for("STATUS", "0 QinQ taps").endswith("; 0 problems")
            node.ovs.vsctl("add-port", PVE_BRIDGE, "tap100i0", "tag=30")
            notify.next_pass()
            assert node.port_vlan("tap100i0")["tag"] == 30 and not tunnelled(node)
        poll(lambda: tunnelled(node))
        assert '"tag":30' in node.port_vlan("tap100i0")["external_ids"]["pve-vhost-agent:saved-vlan"]

        status = node.cli("status")
        assert status.returncode == 0, status.stderr
        assert re.fullmatch(r"1 VM \(1 running\): 0 vhost-user ports \(0 connected\), 1 QinQ tap; "
                            r"checked \d\d:\d\d:\d\d ok; 0 problems\n", status.stdout)  # nothing pending
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=10) == 0
    log = service.stderr.read()
    # The first pass also proved, through the agent's Datapath row, that netdev has two VLAN headers.
    assert log.count("add a Datapath row for netdev, so ovs-vswitchd reports its VLAN depth\n") == 1
    assert log.count("make Proxmox's tap100i0 a QinQ port: S-tag 950 (802.1q), C-VLANs 10-11\n") == 3


# --- (c) leftovers after a migration, and a busy VM ------------------------------------------------


def test_leftovers_of_a_migrated_vm_go_and_a_busy_vms_stay(node):
    nic100 = VhostNic(100, 1, VHOST_BRIDGE, "02:00:00:00:01:01")
    nic101 = VhostNic(101, 1, VHOST_BRIDGE, "02:00:00:00:02:01")
    node.vm(100, ROUTER, nic100)
    node.vm(101, ROUTER, nic101)
    apply_vm_args(node.settings, 101)
    node.make_ports(100)
    node.make_ports(101)
    # VM 100 migrated to pve2: its config moved there, the source ran no stop hook.
    node.root.vm_path(100).rename(_moved(node, 100, "pve2"))
    socket100 = node.leave_socket("ovs", "vm-100-1.sock")
    external = node.leave_socket("external", "vm-100-2.sock")  # the external switch's: never touched
    socket101 = node.leave_socket("ovs", "vm-101-1.sock")
    node.ovs.vsctl("add-port", VHOST_BRIDGE, "vhu102i1", "--", "set", "Interface", "vhu102i1", "type=internal")

    with node.vm_locked(101):  # VM 101 is starting: pre-start made its ports, QEMU has no pidfile yet
        before = node.root.snapshot()
        dry = node.cli("service", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines()[:2] == [
            f"would: remove vhost-user port vhu100i1 from {VHOST_BRIDGE} (VM 100 migrated to node pve2)",
            f"would: remove stale socket {socket100}"]
        assert node.root.snapshot() == before and node.ports() == ["vhu100i1", "vhu101i1", "vhu102i1"]
        result = node.cli("service", "--once")
        assert result.returncode == 0, result.stderr
        assert node.ports() == ["vhu101i1", "vhu102i1"]
        assert not socket100.exists() and socket101.is_socket() and external.is_socket()
        assert f"remove vhost-user port vhu100i1 from {VHOST_BRIDGE} (VM 100 migrated to node pve2)\n" in result.stderr

    # The start failed after pre-start: no hook runs, the lock is free, no QEMU.
    result = node.cli("service", "--once")
    assert result.returncode == 0, result.stderr
    assert (f"remove vhost-user port vhu101i1 from {VHOST_BRIDGE} (VM 101 does not run: a failed start or a stop "
            "without post-stop)") in result.stderr
    assert node.ports() == ["vhu102i1"]  # not the agent's: left alone
    assert not socket101.exists() and external.is_socket()
    status = node.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert {k: shown[k] for k in ("vms", "running", "ovs", "vhost_ports", "qinq_taps", "pending", "problems")} == {
        "vms": 1, "running": 0, "ovs": "ok", "vhost_ports": 0, "qinq_taps": 0, "pending": [], "problems": []}
    assert shown["line"].startswith("1 VM (0 running): 0 vhost-user ports (0 connected), 0 QinQ taps; checked ")


def _moved(node, vmid: int, to: str) -> Path:
    target = node.root.vm_path(vmid, to)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


# --- (d) Open vSwitch down -----------------------------------------------------------------------


def test_ovs_unreachable_is_reported_and_the_rest_still_done(node):
    node.vm(100, ROUTER, VhostNic(100, 1, VHOST_BRIDGE, "02:00:00:00:01:01"))
    result = node.cli("service", "--once", ovsdb=f"unix:/tmp/{PREFIX}-nothing/db.sock")
    assert result.returncode == 6
    assert "1 VM (0 running): Open vSwitch unreachable; last pass" in result.stdout
    assert "cannot reach OVSDB at unix:/tmp/h6sv-nothing/db.sock (No such file or directory)" in result.stdout
    assert "Traceback" not in result.stderr
    assert "size=4096M" in node.args(100)  # args need no OVS


def test_the_service_outlives_ovsdb_server_and_reconnects(node, fresh_ovs, notify):
    ovs = fresh_ovs("h6svdown")
    service = node.start_service(notify, "--interval", "600", ovsdb=ovs.remote)
    assert "0 vhost-user ports" in notify.wait_for("STATUS")
    pid = ovs.pids["ovsdb-server"]
    os.kill(pid, signal.SIGTERM)
    poll(lambda: not _alive(pid))
    assert "Open vSwitch unreachable" in notify.wait_for("STATUS", "unreachable")
    run("ovsdb-server", str(ovs.run_dir / "conf.db"), f"--remote=punix:{ovs.db_sock}",
        "--remote=db:Open_vSwitch,Open_vSwitch,manager_options", "-vconsole:off",
        "--pidfile", "--detach", "--log-file", env=ovs.env)
    ovs.pids["ovsdb-server"] = int((ovs.run_dir / "ovsdb-server.pid").read_text())
    assert "0 problems" in notify.wait_for("STATUS", "ok;", timeout=12)  # retried within OVS_RETRY
    assert service.poll() is None
    service.send_signal(signal.SIGTERM)
    assert service.wait(timeout=10) == 0
    assert "Traceback" not in service.stderr.read()


def test_a_batch_that_fails_for_one_vm_still_serves_the_others(node):
    """Many VMs' port changes go in one batch; when it fails for one VM (here a bridge that
    is gone by the time the batch is written), it is tried again in halves: every other VM
    gets its port and the failure is that VM's alone, reported once."""
    node.ovs.vsctl("add-br", VHOST_BRIDGE, "--", "set", "Bridge", VHOST_BRIDGE, "datapath_type=netdev")
    vmids = list(range(200, 209))
    actions = tuple(AddVhostPort(f"vhu{vmid}i1", VHOST_BRIDGE if vmid != 205 else f"{PREFIX}gone", vmid, "net1",
                                 str(node.settings.socket_dir("ovs") / f"vm-{vmid}-1.sock"), PortVlan("access", 10))
                    for vmid in vmids)
    with Service(node.settings) as service:
        state = service.observe(remember=False)
        failures = service._apply(NodePlan(actions), state)
    assert [(p.vmid, p.message) for p in failures] == [
        (205, f"Open vSwitch bridge {PREFIX}gone does not exist; run the command again to create it")]
    assert node.ports() == [f"vhu{vmid}i1" for vmid in vmids if vmid != 205]


# --- (e) the process systemd sees -------------------------------------------------------------------


def test_ready_status_and_sigterm(node, notify):
    service = node.start_service(notify, "--interval", "600")
    assert notify.wait_for("READY") == "1"
    assert re.fullmatch(r"0 VMs \(0 running\): 0 vhost-user ports \(0 connected\), 0 QinQ taps; "
                        r"last pass \d\d:\d\d:\d\d ok; 0 problems", notify.wait_for("STATUS"))
    service.send_signal(signal.SIGTERM)
    assert service.wait(timeout=10) == 0
    assert notify.wait_for("STOPPING") == "1"
    assert "SIGTERM received" in service.stderr.read()


# --- (f) a NIC changed while its VM runs -----------------------------------------------------------


def _running_with_port(node, vlan):
    """VM 100 started with net1 (tag 10): its port made at pre-start, its socket served by QEMU."""
    node.vm(100, ROUTER, VhostNic(100, 1, VHOST_BRIDGE, "02:00:00:00:01:01", vlan=vlan))
    apply_vm_args(node.settings, 100)
    node.make_ports(100)
    node.leave_socket("ovs", "vm-100-1.sock")


def test_the_service_brings_a_running_vms_port_in_step_but_never_replaces_it(node):
    _running_with_port(node, VlanPolicy(tag=10))
    with node.running(100):
        update_spec(node.settings, lambda spec: spec.with_entry(
            VhostNic(100, 1, VHOST_BRIDGE, "02:00:00:00:01:01", vlan=VlanPolicy(tag=20), mtu=9000)))
        result = node.cli("service", "--once")
        assert result.returncode == 0, result.stderr
        assert node.ovs.get("Port", "vhu100i1", "tag", "vlan_mode")["tag"] == 20
        assert node.ovs.get("Interface", "vhu100i1", "mtu_request") == {"mtu_request": 9000}

        uuid = node.ovs.get("Port", "vhu100i1", "_uuid")
        node.ovs.vsctl("del-port", "vhu100i1")  # deleted by hand while the VM runs
        result = node.cli("service", "--once")
        assert result.returncode == 0, result.stderr
        port = node.ovs.get("Interface", "vhu100i1", "options")
        assert port["options"]["vhost-server-path"] == str(node.settings.socket_dir("ovs") / "vm-100-1.sock")
        assert node.ovs.get("Port", "vhu100i1", "tag")["tag"] == 20 and node.ovs.get("Port", "vhu100i1", "_uuid") != uuid

        # A new bridge needs a new port: not while QEMU is connected to this one.
        node.ovs.vsctl("add-br", PVE_BRIDGE, "--", "set", "Bridge", PVE_BRIDGE, "datapath_type=netdev")
        update_spec(node.settings, lambda spec: spec.with_entry(
            VhostNic(100, 1, PVE_BRIDGE, "02:00:00:00:01:01", vlan=VlanPolicy(tag=20), mtu=9000)))
        kept = node.ovs.get("Port", "vhu100i1", "_uuid")
        result = node.cli("service", "--once")
        assert result.returncode == 0, result.stderr
        assert node.ovs.get("Port", "vhu100i1", "_uuid") == kept
        assert node.ovs.find("Port", "name=vhu100i1") == ["vhu100i1"]
        note = (f"VM 100: re-creating port vhu100i1 (bridge {VHOST_BRIDGE} -> {PVE_BRIDGE}) "
                "takes effect at the next start")
        assert note in result.stderr
        status = json.loads(node.cli("status", "--json").stdout)
        assert status["at_next_start"] == [note] and status["pending"] == []


def test_nic_set_on_a_running_vm_reaches_ovs_at_once(node):
    _running_with_port(node, VlanPolicy(tag=10))
    with node.running(100):
        result = node.cli("nic", "set", "100", "net1", "--tag", "20")
        assert result.returncode == 0, result.stderr
        assert "VM 100: set port vhu100i1 to VLAN tag 20 (running VM, at once)" in result.stdout
        assert node.ovs.get("Port", "vhu100i1", "tag")["tag"] == 20

        result = node.cli("nic", "set", "100", "net1", "--mtu", "9000", "--dry-run")
        assert "dry run: would set port vhu100i1 to MTU 9000" in result.stdout
        assert node.ovs.get("Interface", "vhu100i1", "mtu_request") == {"mtu_request": []}

        result = node.cli("nic", "add", "100", "net2", "--bridge", VHOST_BRIDGE, "--tag", "30")
        assert result.returncode == 0, result.stderr
        assert "VM 100: port vhu100i2 (the running QEMU has no net2 yet) takes effect at the next start" in result.stdout
        assert node.ovs.find("Port", "name=vhu100i2") == []

        result = node.cli("nic", "remove", "100", "net1")
        assert result.returncode == 0, result.stderr
        assert ("VM 100: removing port vhu100i1 (QEMU still has its NIC) takes effect at the next start"
                in result.stdout)
        assert node.ovs.find("Port", "name=vhu100i1") == ["vhu100i1"]


def test_nic_set_on_a_running_vm_with_ovs_down_says_who_catches_up(node):
    _running_with_port(node, VlanPolicy(tag=10))
    with node.running(100):
        down = f"unix:{node.root.root}/no-ovsdb.sock"
        result = node.cli("nic", "set", "100", "net1", "--tag", "20", ovsdb=down)
        assert result.returncode == 6 and len(result.stderr.splitlines()) == 1
        assert "VM 100: spec and args written, but its running ports were not changed" in result.stderr
        assert "the service applies the change once Open vSwitch answers again" in result.stderr
        assert load_spec(node.settings).entry(100, 1).vlan.tag == 20
        assert node.ovs.get("Port", "vhu100i1", "tag")["tag"] == 10
