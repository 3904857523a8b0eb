"""Live migration of a VM with a vhost-user NIC between two stand-in nodes, end to end.

Two Proxmox hosts on one machine. Each node has a mount namespace of its own
(pvestandin.hostns) in which the cluster's common root path shows that node's own
folder, and an OVS-DPDK of its own (own network namespace; its ovs-vswitchd runs in the
node's mount namespace, so it reaches the sockets that node's QEMU serves). The agent
uses that one path as `--root` on both nodes, as every Proxmox host uses `/`: the VM's
cluster-wide `args:` line names one socket path, and each node finds its own socket
there. QEMU, the hooks, the CLI and the service of a node all run inside its namespaces;
both namespaces start from the session's private journald, so its journal tells the story.

The VM (vhost-user net1, backend ovs, balloon 0) is enabled with the CLI on nodeA,
started there, and migrated with the stand-in's `migrate` as qemu-server does it:
pre-start/post-start on nodeB with PVE_MIGRATED_FROM=nodeA while the config is still in
nodeA's folder, no stop hook on nodeA. Then nodeA's service removes what is left there.

- a paused VM (with QinQ on a Proxmox tap NIC too): the port follows the VM, the service
  cleans nodeA, a stop on nodeB leaves nothing on either node;
- a failed migration (nodeB's agent cannot reach its OVS): aborted, the VM stays on nodeA
  untouched; the retry goes through;
- a real guest (slow): booted on nodeA, migrated while it runs, gets its first ping reply
  on nodeB and loses none while nodeA is cleaned.
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

from fixtures.guest import NO_REPLY, READY, RELEASED, REPLY, kernel_command_line
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

    def qm(self, paused: bool = True, **env: str) -> Qm:
        return Qm(self.cluster, self.name, paused=paused, env=self.env(**env), hook_timeout=60, start_timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`pve-vhost-agent ARGS` on this node (its namespaces, its environment); must succeed."""
        result = subprocess.run([*self.node.enter(), "/usr/bin/python3", "-m", "pve_vhost_agent", *args],
                                env=self.env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
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


def declare_vm(hosts: dict[str, Host], *, tap_nic: bool, memory: int = 128) -> Vm:
    """A router VM declared and enabled on nodeA; the hookscript installed on nodeB too."""
    a, b = hosts["nodeA"], hosts["nodeB"]
    tag = uuid.uuid4().hex[:6]
    made = Vm(100_000 + uuid.uuid4().int % 800_000, f"{PREFIX}v{tag}")  # unique in the session's journal
    tap = f"net0: virtio=BC:24:11:00:00:01,bridge={TAP_BRIDGE},tag=950\n" if tap_nic else ""
    a.cluster.write_vm_config("nodeA", made.vmid, f"balloon: 0\nmemory: {memory}\nname: {PREFIX}-router\n{tap}")
    a.cli("nic", "add", str(made.vmid), "net1", "--bridge", made.bridge)
    if tap_nic:
        a.cli("qinq", "set", str(made.vmid), "net0", "--qinq", "950")
    a.cli("enable", str(made.vmid))
    b.cli("install-hook")  # the package's postinst does this on every node
    return made


def forget_vm(hosts: dict[str, Host], made: Vm) -> None:
    """Whatever a failed test left: QEMU by PID, ports, bridges, configs."""
    cluster = hosts["nodeA"].cluster
    kill_leftovers(cluster)
    for host in hosts.values():
        for port in host.owned_ports(made.vmid):
            host.ovs.vsctl("--if-exists", "del-port", port)
        host.ovs.vsctl("--if-exists", "del-br", made.bridge)
    for name in NODES:
        cluster.pve.joinpath("nodes", name, "qemu-server", f"{made.vmid}.conf").unlink(missing_ok=True)


@pytest.fixture
def vm(hosts):
    """vhost-user net1 and a Proxmox tap NIC net0 with QinQ."""
    made = declare_vm(hosts, tap_nic=True)
    yield made
    forget_vm(hosts, made)


@pytest.fixture
def guest_vm(hosts):
    """vhost-user net1 only: the guest's eth0."""
    made = declare_vm(hosts, tap_nic=False, memory=256)
    yield made
    forget_vm(hosts, made)


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
    assert f"(VM {vm.vmid} migrated to node nodeB)\n" in service.stderr, service.stderr
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


# --- a real guest across the migration ----------------------------------------------------

GUEST_IP, PEER_IP = "192.0.2.2", "192.0.2.1"  # TEST-NET-1, inside private namespaces only
BOOT = 120  # seconds from QEMU start until the guest has configured its NIC, on a busy machine
WINDOW = 240  # seconds the guest pings before its first reply (it gives up after that)
HOLD = 300  # after a reply it pings until one goes unanswered (or this long), then powers off


@dataclasses.dataclass
class Lan:
    """The VM's bridge on both nodes, joined by an uplink (veth), and a peer behind nodeB.

    The guest stops at its first unanswered ping after a reply, and a ping in flight while
    the VM switches nodes is lost (the source's vhost-user rings are stopped by then). So
    the peer answers ARP but ignores pings until the VM runs on nodeB. Behind nodeB, not
    nodeA: when the service deletes nodeA's last DPDK port, OVS-DPDK there tears down its
    PMD thread, which can stall nodeA's datapath past a 1 s ping timeout on this 2-core
    machine (OVS, not the agent).
    """

    peer_netns: str
    uplink: str

    @staticmethod
    def build(hosts: dict[str, Host], bridge: str, tag: str) -> "Lan":
        a, b = hosts["nodeA"], hosts["nodeB"]
        lan = Lan(f"{PREFIX}-peer-{tag}", f"{PREFIX}u{tag}")
        for host in (a, b):  # the operator's bridge with its uplink, on each host
            host.ovs.vsctl("add-br", bridge, "--", "set", "Bridge", bridge, "datapath_type=netdev")
        a.ovs.ip("link", "add", lan.uplink, "type", "veth", "peer", "name", lan.uplink, "netns", b.ovs.netns)
        for host in (a, b):
            host.ovs.ip("link", "set", lan.uplink, "up")
            host.ovs.vsctl("add-port", bridge, lan.uplink)
        b.ovs.plug_namespace(f"{PREFIX}p{tag}", lan.peer_netns)
        b.ovs.vsctl("add-port", bridge, f"{PREFIX}p{tag}")
        lan.peer("addr", "add", f"{PEER_IP}/24", "dev", "eth0")
        lan.answer_pings(False)
        return lan

    def peer(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.peer_netns, *args], check=True, capture_output=True, timeout=20)

    def answer_pings(self, answer: bool) -> None:
        subprocess.run(["ip", "netns", "exec", self.peer_netns, "sysctl", "-q",
                        f"net.ipv4.icmp_echo_ignore_all={0 if answer else 1}"],
                       check=True, capture_output=True, timeout=20)

    def remove(self, hosts: dict[str, Host]) -> None:
        hosts["nodeB"].ovs.unplug_namespace(self.peer_netns)
        subprocess.run(["ip", "-n", hosts["nodeA"].ovs.netns, "link", "del", self.uplink], capture_output=True)


def console(host: Host, vmid: int) -> str:
    """The guest's serial console while it ran on `host` (each node's QEMU writes its own)."""
    path = host.node.path(f"/run/{PREFIX}-console-{vmid}.log")
    return path.read_text(errors="replace") if path.exists() else ""


def console_line(host: Host, vmid: int, *markers: str) -> str | None:
    return next((line for line in console(host, vmid).splitlines() if line.startswith(markers)), None)


def counters(host: Host, port: str) -> tuple[int, int]:
    """Packets OVS got from the guest and sent to it on `port` (refreshed every 5 s)."""
    stats = host.ovs.get("Interface", port, "statistics")["statistics"]
    return stats.get("rx_packets", 0), stats.get("tx_packets", 0)


def wait_for_traffic(host: Host, port: str, sent: int, received: int, timeout: float = 30) -> None:
    """The guest sends `sent` more packets through `port` and receives `received` more."""
    rx0, tx0 = counters(host, port)
    wait_for(lambda: (lambda rx, tx: rx - rx0 >= sent and tx - tx0 >= received)(*counters(host, port)),
             timeout, f"{sent} packets from and {received} to the guest through {port} on {host.name}")


@pytest.mark.slow
def test_a_real_guest_keeps_its_network_through_the_migration(hosts, guest_vm, guest_image):
    a, b, vm = hosts["nodeA"], hosts["nodeB"], guest_vm
    lan = Lan.build(hosts, vm.bridge, vm.bridge[-6:])
    try:
        # The guest's kernel and console are the operator's part of the args line; the agent
        # keeps it and adds its own. Each node's QEMU writes the console into its own /run.
        append = kernel_command_line(f"{GUEST_IP}/24", PEER_IP, timeout=WINDOW, hold=HOLD)
        serial = a.cluster.host_root / f"run/{PREFIX}-console-{vm.vmid}.log"
        path = a.node.vm_conf(vm.vmid)
        path.write_text(path.read_text().replace("args: ", (
            f"args: -kernel {guest_image.kernel} -initrd {guest_image.initrd} -append '{append}' "
            f"-serial file:{serial} -no-reboot "), 1))
        a.cli("apply", str(vm.vmid))  # the agent's words stay last, the operator's are kept

        started = a.qm(paused=False).start(vm.vmid)
        wait_for(lambda: console_line(a, vm.vmid, READY, NO_REPLY), BOOT, "the guest's NIC set-up")
        # On nodeA its pings (unanswered for now) leave through nodeA's port.
        wait_for(lambda: counters(a, vm.port)[0] >= 5, 30, f"5 packets from the guest through {vm.port} on nodeA")

        began = time.monotonic()
        moved = migrate(a.qm(paused=False), b.qm(paused=False), vm.vmid)
        took = time.monotonic() - began
        assert qemu.qmp_command(moved.qmp, "query-status")["status"] == "running"
        assert not qemu.is_alive(started.pid) and vm.port in a.owned_ports(vm.vmid)

        # The same guest (no new boot), now on nodeB, gets its first reply there and keeps pinging.
        lan.answer_pings(True)
        wait_for(lambda: console_line(b, vm.vmid, REPLY, NO_REPLY), 30, "the guest's first reply on nodeB")
        assert console_line(b, vm.vmid, REPLY) and console_line(a, vm.vmid, REPLY, NO_REPLY) is None
        assert console_line(b, vm.vmid, READY) is None
        wait_for_traffic(b, vm.port, sent=10, received=10)

        # nodeA's service removes nodeA's leftover port; the guest on nodeB loses no ping.
        a.cli("service", "--once")
        assert a.owned_ports(vm.vmid) == []
        wait_for_traffic(b, vm.port, sent=10, received=10)
        assert console_line(b, vm.vmid, RELEASED) is None

        lan.peer("link", "set", "eth0", "down")  # the peer goes silent: the guest powers off
        wait_for(lambda: console_line(b, vm.vmid, RELEASED), 30, "the guest's poweroff on nodeB")
        # QEMU runs with -no-shutdown: qmeventd sees the guest's poweroff, ends QEMU, runs `qm cleanup`.
        wait_for(lambda: qemu.qmp_command(moved.qmp, "query-status")["status"] == "shutdown", 30,
                 "QEMU's shutdown state")
        assert [run.phase for run in b.qm().shutdown_from_guest(vm.vmid).hooks] == ["post-stop"]
        for host in (a, b):
            assert host.owned_ports(vm.vmid) == [] and host.sockets() == [], host.name
        print(f"real guest: migration nodeA -> nodeB took {took:.1f} s")
    except AssertionError as err:
        raise AssertionError(f"{err}\nconsole on nodeA:\n{console(a, vm.vmid)}\n"
                             f"console on nodeB:\n{console(b, vm.vmid)}") from err
    finally:
        kill_leftovers(a.cluster)
        lan.remove(hosts)


def test_a_vm_migrated_back_before_the_service_ran_gets_its_old_port_again(hosts, vm):
    a, b = hosts["nodeA"], hosts["nodeB"]
    a.qm().start(vm.vmid)
    first = a.vhost_iface(vm.port)
    migrate(a.qm(), b.qm(), vm.vmid)
    # Back within one service interval: nodeA's leftover port is the one its pre-start plans.
    back = migrate(b.qm(), a.qm(), vm.vmid)
    assert a.vhost_iface(vm.port) == first and chardev_connected(back)
    assert b.owned_ports(vm.vmid) == [vm.port]  # nodeB's leftover now
    a.cli("service", "--once")
    b.cli("service", "--once")
    assert a.vhost_iface(vm.port) == first and chardev_connected(back)
    assert b.owned_ports(vm.vmid) == [] and b.sockets() == []
    a.qm().stop(vm.vmid)
    assert a.owned_ports(vm.vmid) == [] and a.sockets() == []


def test_a_running_vm_with_a_pending_memory_change_migrates_with_its_running_memory(hosts, vm):
    a, b = hosts["nodeA"], hosts["nodeB"]
    a.qm().start(vm.vmid)
    # `qm set --memory 256` on the running VM: pending until its next start. The migration
    # start does not apply it (qemu-server applies pending changes only without --stateuri).
    path = a.node.vm_conf(vm.vmid)
    path.write_text(path.read_text() + "\n[PENDING]\nmemory: 256\n")
    moved = migrate(a.qm(), b.qm(), vm.vmid)
    assert moved.argv[moved.argv.index("-m") + 1] == "128"
    assert "memory-backend-memfd,id=vhu-mem,size=128M,share=on" in moved.argv and chardev_connected(moved)
    # nodeB's service gives the pending change its args; the next start uses both.
    b.cli("service", "--once")
    b.qm().stop(vm.vmid)
    again = b.qm().start(vm.vmid)
    assert again.argv[again.argv.index("-m") + 1] == "256"
    assert "memory-backend-memfd,id=vhu-mem,size=256M,share=on" in again.argv and chardev_connected(again)
    b.qm().stop(vm.vmid)
