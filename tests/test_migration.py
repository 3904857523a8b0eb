"""Live migration of a VM with a vhost-user NIC between two stand-in nodes, end to end.

Two Proxmox hosts on one machine. Each node has a mount namespace of its own
(pvestandin.hostns) in which the cluster's common root path shows that node's own
folder, and an OVS-DPDK of its own (own network namespace; its ovs-vswitchd runs in the
node's mount namespace, so it reaches the sockets that node's QEMU serves). The agent
uses that one path as `--root` on both nodes, as every Proxmox host uses `/`: the VM's
cluster-wide `args:` line names one socket path, and each node finds its own socket
there. QEMU, the hooks, the CLI and the service of a node all run inside its namespaces;
both namespaces start from the session's private journald, so its journal tells the story.

The VM (vhost-user net1, backend ovs, balloon 0; QinQ on its Proxmox tap NIC net0) is
enabled with the CLI on nodeA, started there, and migrated with the stand-in's `migrate`
exactly as qemu-server does it: pre-start/post-start on nodeB with PVE_MIGRATED_FROM=nodeA
while the config is still in nodeA's folder, no stop hook on nodeA.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from fixtures.ovs import OvsInstance, start_ovs
from pvestandin import Cluster, MigrationFailed, Node, Qm, RunningVm, kill_leftovers, migrate, qemu

from conftest import PEER, REPO

PREFIX = "h9mg"
NODES = ("nodeA", "nodeB")
TAP_BRIDGE = f"{PREFIX}br"  # stands in for the vmbr0 both hosts have (Proxmox's tap NICs)


@dataclasses.dataclass
class Host:
    """One stand-in node with its own namespaces and OVS-DPDK."""

    cluster: Cluster
    node: Node
    ovs: OvsInstance

    @property
    def name(self) -> str:
        return self.node.name

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), "PVE_VHOST_AGENT_ROOT": str(self.cluster.host_root),
                "PVE_VHOST_AGENT_NODE": self.name, "PVE_VHOST_AGENT_OVSDB": self.ovs.remote, **extra}

    def qm(self, **env: str) -> Qm:
        return Qm(self.cluster, self.name, env=self.env(**env), hook_timeout=60, start_timeout=60)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`pve-vhost-agent ARGS` on this node (its namespaces, its environment)."""
        result = subprocess.run([*self.node.enter(), "/usr/bin/python3", "-m", "pve_vhost_agent", *args],
                                env=self.env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert not check or result.returncode == 0, result.stdout + result.stderr
        return result

    def socket(self, vmid: int, nic: int = 1) -> Path:
        """The node's own `ovs` socket of the VM, as the test (outside the node) reaches it."""
        return self.node.path(f"/run/pve-vhost-agent/ovs/vm-{vmid}-{nic}.sock")

    def sockets(self) -> list[str]:
        folder = self.node.path("/run/pve-vhost-agent/ovs")
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    def owned_ports(self, vmid: int) -> list[str]:
        return self.ovs.find("Port", f"external_ids:pve-vhost-agent\\:vmid={vmid}")

    def vhost_iface(self, port: str) -> dict:
        return self.ovs.get("Interface", port, "_uuid", "type", "options")


@pytest.fixture(scope="module")
def hosts(journald):
    """nodeA and nodeB: own mount namespace (from journald's), own OVS-DPDK, one shared /etc/pve."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/tmp"))
    cluster = Cluster(workdir / "cluster", PEER / "qemu-server-readconfig")
    started: list = []
    found: dict[str, Host] = {}
    try:
        for name in NODES:
            namespace = cluster.host_namespace(name, inside=journald.mount_ns)
            started.append(namespace)
            ovs = start_ovs(f"{PREFIX}{name[-1]}", dpdk=True, other_config={"vlan-limit": "2"},
                            mount_ns=namespace.path)
            started.append(ovs)
            ovs.vsctl("add-br", TAP_BRIDGE, "--", "set", "Bridge", TAP_BRIDGE, "datapath_type=netdev")
            found[name] = Host(cluster, cluster.add_node(name, netns=ovs.netns, ovsdb=ovs.remote,
                                                         mount_ns=namespace.path), ovs)
        yield found
    finally:
        kill_leftovers(cluster)
        for thing in reversed(started):
            thing.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@dataclasses.dataclass
class Vm:
    vmid: int
    bridge: str  # the agent's vhost-user bridge (it creates it on each node's OVS)

    @property
    def port(self) -> str:
        return f"vhu{self.vmid}i1"

    @property
    def tap(self) -> str:
        return f"tap{self.vmid}i0"


@pytest.fixture
def vm(hosts):
    """A router VM declared and enabled on nodeA; the hookscript installed on nodeB too."""
    a, b = hosts["nodeA"], hosts["nodeB"]
    tag = uuid.uuid4().hex[:6]
    made = Vm(100_000 + uuid.uuid4().int % 800_000, f"{PREFIX}v{tag}")  # unique in the session's journal
    a.cluster.write_vm_config("nodeA", made.vmid, (
        f"balloon: 0\nmemory: 128\nname: {PREFIX}-router\n"
        f"net0: virtio=BC:24:11:00:00:01,bridge={TAP_BRIDGE}\n"))
    a.cli("nic", "add", str(made.vmid), "net1", "--bridge", made.bridge)
    a.cli("qinq", "set", str(made.vmid), "net0", "--qinq", "950")
    a.cli("enable", str(made.vmid))
    b.cli("install-hook")  # the package's postinst does this on every node
    yield made
    kill_leftovers(a.cluster)
    for host in hosts.values():
        for port in host.owned_ports(made.vmid):
            host.ovs.vsctl("--if-exists", "del-port", port)
        host.ovs.vsctl("--if-exists", "del-br", made.bridge)
    for name in NODES:
        a.cluster.pve.joinpath("nodes", name, "qemu-server", f"{made.vmid}.conf").unlink(missing_ok=True)


def chardev_connected(vm: RunningVm, label: str = "vhu-net1") -> bool:
    for dev in qemu.qmp_command(vm.qmp, "query-chardev"):
        if dev["label"] == label:
            return not dev["filename"].startswith("disconnected:")
    raise AssertionError(f"QEMU has no chardev {label}")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


def hook_runs(journald, vmid: int) -> list[str]:
    """The phase of each hook run for `vmid` in the journal (one process each), in order."""
    runs: dict[str, str] = {}
    for entry in journald.read("SYSLOG_IDENTIFIER=pve-vhost-agent", f"VMID={vmid}"):
        if "PHASE" in entry:
            runs.setdefault(entry["_PID"], entry["PHASE"])
    return list(runs.values())


def wait_for_runs(journald, vmid: int, expected: list[str], timeout: float = 10) -> None:
    """journald takes entries asynchronously: wait until the runs are `expected` (never more)."""
    deadline = time.monotonic() + timeout
    while (runs := hook_runs(journald, vmid)) != expected:
        assert len(runs) < len(expected) and time.monotonic() < deadline, runs
        time.sleep(0.05)


def test_live_migration_moves_the_port_and_the_service_removes_the_source_leftovers(hosts, vm, journald):
    a, b = hosts["nodeA"], hosts["nodeB"]
    socket_path = str(a.cluster.host_root / f"run/pve-vhost-agent/ovs/vm-{vm.vmid}-1.sock")
    assert socket_path in a.node.vm_conf(vm.vmid).read_text()  # one args line for every node

    started = a.qm().start(vm.vmid)
    assert a.vhost_iface(vm.port)["options"]["vhost-server-path"] == socket_path
    assert chardev_connected(started) and a.socket(vm.vmid).is_socket()
    assert b.owned_ports(vm.vmid) == [] and b.sockets() == []

    began = time.monotonic()
    moved = migrate(a.qm(), b.qm(), vm.vmid)
    took = time.monotonic() - began

    # The VM runs on nodeB now, its config in nodeB's folder (unlocked again).
    assert moved.node == "nodeB" and b.qm().pid(vm.vmid) == moved.pid
    assert a.qm().pid(vm.vmid) is None and not qemu.is_alive(started.pid)
    assert not a.node.vm_conf(vm.vmid).exists()
    assert "lock:" not in b.node.vm_conf(vm.vmid).read_text()
    # nodeB's pre-start (with PVE_MIGRATED_FROM=nodeA) made the port before QEMU's -incoming
    # start, on nodeB's own OVS, for nodeB's own socket; QEMU's vhost-user side is connected.
    assert [(run.phase, Path(run.argv[0]).is_relative_to(b.node.root)) for run in moved.task.hooks] == [
        ("pre-start", True), ("post-start", True)]
    iface = b.vhost_iface(vm.port)
    assert (iface["type"], iface["options"]["vhost-server-path"]) == ("dpdkvhostuserclient", socket_path)
    assert b.socket(vm.vmid).is_socket() and chardev_connected(moved)
    # post-start on nodeB put QinQ on the tap port Proxmox plugged there.
    tap = b.ovs.get("Port", vm.tap, "vlan_mode", "tag")
    assert (tap["vlan_mode"], tap["tag"]) == ("dot1q-tunnel", 950)

    # nodeA ran no stop hook: its vhost-user port is a leftover now. (Its QEMU quit cleanly:
    # the socket it served is gone, and its downscript unplugged Proxmox's tap port.)
    wait_for_runs(journald, vm.vmid, ["pre-start", "post-start", "pre-start", "post-start"])
    assert a.owned_ports(vm.vmid) == [vm.port] and a.vhost_iface(vm.port)["type"] == "dpdkvhostuserclient"
    assert not a.socket(vm.vmid).exists()
    before_b = b.vhost_iface(vm.port)

    # nodeB's service sees its VM running and plans nothing; nodeA's removes the leftovers.
    dry = b.cli("service", "--dry-run")
    assert "would:" not in dry.stdout, dry.stdout
    service = a.cli("service", "--once")
    assert f"VM {vm.vmid} lives on node nodeB now (migrated away)" in service.stderr, service.stderr
    assert a.owned_ports(vm.vmid) == [] and a.ovs.find("Port", f"name={vm.port}") == []
    assert not a.socket(vm.vmid).exists()
    assert b.vhost_iface(vm.port) == before_b and b.socket(vm.vmid).is_socket() and chardev_connected(moved)

    b.qm().stop(vm.vmid)
    for host in (a, b):
        assert host.owned_ports(vm.vmid) == [] and host.sockets() == [], host.name
        assert host.qm().pid(vm.vmid) is None
    assert b.ovs.find("Port", f"name={vm.tap}") == []
    wait_for_runs(journald, vm.vmid, ["pre-start", "post-start", "pre-start", "post-start", "pre-stop", "post-stop"])
    print(f"migration nodeA -> nodeB took {took:.1f} s")


def test_a_migration_whose_target_cannot_make_the_port_is_aborted_and_the_vm_stays(hosts, vm):
    a, b = hosts["nodeA"], hosts["nodeB"]
    started = a.qm().start(vm.vmid)
    before = a.vhost_iface(vm.port)

    # nodeB's agent cannot reach its OVS: pre-start fails there, Proxmox aborts the migration.
    unreachable = f"unix:{b.node.root}/no-ovsdb.sock"
    with pytest.raises(MigrationFailed) as caught:
        migrate(a.qm(), b.qm(PVE_VHOST_AGENT_OVSDB=unreachable), vm.vmid)
    assert "cannot reach OVSDB" in caught.value.task.text
    assert [run.phase for run in caught.value.task.hooks] == ["pre-start"]

    # The VM goes on as before on nodeA: same QEMU, config (unlocked) and port, still connected.
    assert a.qm().pid(vm.vmid) == started.pid
    assert "lock:" not in a.node.vm_conf(vm.vmid).read_text() and not b.node.vm_conf(vm.vmid).exists()
    assert a.vhost_iface(vm.port) == before and chardev_connected(started)
    assert b.owned_ports(vm.vmid) == [] and b.sockets() == [] and b.qm().pid(vm.vmid) is None
    # nodeA's service leaves a VM that runs there alone.
    a.cli("service", "--once")
    assert a.vhost_iface(vm.port) == before and a.socket(vm.vmid).is_socket()

    # Once nodeB's OVS is reachable, the same migration goes through.
    moved = migrate(a.qm(), b.qm(), vm.vmid)
    assert chardev_connected(moved) and vm.port in b.owned_ports(vm.vmid)
    b.qm().stop(vm.vmid)
    a.cli("service", "--once")
    for host in (a, b):
        assert host.owned_ports(vm.vmid) == [] and host.sockets() == [], host.name
