"""The agent's vhost-user port connects to a real, paused QEMU started with the planned args.

Pre-start order as in a Proxmox hook: the agent makes the OVS port first, then QEMU starts
with the args planner's line (server socket, memfd shared memory). QEMU (TCG, `-S`) waits
in its vhost-user setup until OVS-DPDK connects. OVS reports `connected` only once a guest
driver starts the device, so QEMU's own view (QMP query-chardev) is what is checked.
"""

import json
import socket
import subprocess
import time

import pytest

from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ovs import plan_vhost_ports, plan_vm_removal
from pve_vhost_agent.adapters.qemu import installed_version
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import Backend, VhostNic, VmSpec

VMID, BRIDGE = 100, "h3vq0"
CONFIG = {"memory": "256", "balloon": "0", "cores": "1"}  # a Proxmox VM config, numa off


class Qmp:
    """Just enough QMP: connect, negotiate, execute."""

    def __init__(self, path, deadline):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise AssertionError(f"QEMU's QMP socket {path} did not appear") from None
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command):
        self.file.write(json.dumps({"execute": command}) + "\n")
        self.file.flush()
        while "event" in (reply := json.loads(self.file.readline())):
            pass
        return reply["return"]

    def close(self):
        self.file.close()
        self.sock.close()


@pytest.fixture
def qemu_run(ovs_tmp):
    """start(args) -> (process, qmp); QEMU is killed by its PID after the test."""
    procs, qmps = [], []

    def start(args):
        qmp_path = ovs_tmp / "qmp.sock"
        procs.append(subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", CONFIG["memory"], "-nodefaults",
             "-display", "none", "-S", "-qmp", f"unix:{qmp_path},server=on,wait=off", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        qmps.append(Qmp(qmp_path, time.monotonic() + 30))
        return procs[-1], qmps[-1]

    yield start
    for qmp in qmps:
        qmp.close()
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=30)


def test_a_paused_qemu_with_the_planned_args_gets_the_ovs_connection(ovs_dpdk, ovs_tmp, qemu_run):
    settings = Settings(root=ovs_tmp)
    spec = VmSpec(VMID, (VhostNic(VMID, 1, BRIDGE, "02:00:00:00:64:01", mtu=1500),))
    sockets = {backend: settings.socket_dir(backend.value) for backend in Backend}
    sockets[Backend.OVS].mkdir(parents=True)
    args = plan_args(spec, CONFIG, installed_version("qemu-system-x86_64"), sockets).args
    assert f"socket,id=vhu-net1,path={sockets[Backend.OVS]}/vm-100-1.sock,server=on,wait=off" in args

    with Ovsdb(ovs_dpdk.remote, timeout=10) as db:
        try:
            db.apply(plan_vhost_ports(spec, db.snapshot(), sockets[Backend.OVS]))  # pre-start
            proc, qmp = qemu_run(args)
            deadline = time.monotonic() + 60
            while (chardev := _chardev(qmp, "vhu-net1"))["filename"].startswith("disconnected:"):
                assert proc.poll() is None, f"QEMU exited: {proc.communicate()[0]}"
                assert time.monotonic() < deadline, f"OVS never connected: {chardev}"
                time.sleep(0.1)
            assert chardev["filename"].startswith(f"unix:{sockets[Backend.OVS]}/vm-100-1.sock")
            assert qmp.execute("query-status")["status"] == "prelaunch"
            iface = db.snapshot().port("vhu100i1").interface
            assert iface.status.get("mode") == "client" and iface.error == ""
            # OVS-DPDK's side of the same socket (its Interface.status waits for a guest driver).
            ovs_dpdk.wait_for_log(f"VHOST_CONFIG: ({sockets[Backend.OVS]}/vm-100-1.sock) connected")
        finally:
            db.apply(plan_vm_removal(VMID, db.snapshot()))  # post-stop
            ovs_dpdk.vsctl("--if-exists", "del-br", BRIDGE)


def _chardev(qmp, label):
    return next(c for c in qmp.execute("query-chardev") if c["label"] == label)
