"""VM-to-VM links end to end through the Proxmox stand-in: real QEMU, two nodes.

Two stand-in nodes, pve1 and pve2, each in a network namespace of its own (its private
Open vSwitch's: the service reads one), joined by a veth pair as their cluster network
(10.0.11.1 and 10.0.11.2, corosync's ring0_addr). QEMU, the hooks, the CLI and the
service of a node run in its namespace, so the link ports (20000 and up in the test's
own cluster) never meet another test run's. The QEMUs stay paused (-S): what is checked
here is what the agent gives them (the args, the sockets QEMU holds, where they point);
tests/test_links_guests.py sends frames through real guests.

- ends start in any order; a stopped peer is a dark link; each end's socket is the
  agent's, bound and connected, on its hub (QEMU's own list of netdevs says so);
- a live migration of one end: its own socket follows at the target's post-start, and
  each node's service re-points the peers there without restarting them;
- `link remove` on running VMs disconnects at once; what the running QEMU cannot take
  waits for its next start, as `status` and `link list` say.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import PEER, REPO
from fixtures.ovs import start_ovs
from pvestandin import Cluster, Node, Qm, kill_leftovers, migrate, qemu

PREFIX = "h11lk"
UNDERLAY = {"pve1": "10.0.11.1", "pve2": "10.0.11.2"}
COROSYNC = "totem {\n  cluster_name: lab\n}\n\nnodelist {\n" + "".join(
    f"  node {{\n    name: {name}\n    nodeid: {n}\n    quorum_votes: 1\n    ring0_addr: {address}\n  }}\n"
    for n, (name, address) in enumerate(UNDERLAY.items(), start=1)) + "}\n"


@dataclasses.dataclass
class Lab:
    cluster: Cluster
    nodes: dict[str, Node]
    started: list

    def env(self, node: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), "PVE_VHOST_AGENT_ROOT": str(self.nodes[node].root),
                "PVE_VHOST_AGENT_NODE": node, "PVE_VHOST_AGENT_OVSDB": self.nodes[node].ovsdb}

    def cli(self, node: str, *args: str, code: int | None = 0) -> subprocess.CompletedProcess:
        """`pve-vhost-agent ARGS` on `node` (in its network namespace); `code` None: any exit code."""
        result = subprocess.run([*self.nodes[node].enter(), "/usr/bin/python3", "-m", "pve_vhost_agent", *args],
                                env=self.env(node), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert code is None or result.returncode == code, result.stdout + result.stderr
        return result

    def qm(self, node: str, paused: bool = True) -> Qm:
        return Qm(self.cluster, node, paused=paused, env=self.env(node), hook_timeout=60, start_timeout=60)

    def vm(self, node: str, name: str, extra: str = "") -> int:
        vmid = 100_000 + uuid.uuid4().int % 800_000
        self.cluster.write_vm_config(node, vmid, f"memory: 128\nname: {name}\n{extra}")
        return vmid

    def sockets(self, node: str, vmid: int) -> dict[int, tuple[tuple[str, int], tuple[str, int]]]:
        """Link end N -> (local, remote) of each socket VM `vmid`'s QEMU has, read from its
        netdev ids (QEMU's own `info network`), each checked against the kernel's view."""
        text = qemu.qmp_command(self.qm(node).run_file(vmid, "qmp"), "human-monitor-command",
                                **{"command-line": "info network"})
        found = {}
        for index, local, remote in re.findall(r"vhu-udp(\d+)-([0-9a-f]+-\d+)-([0-9a-f]+-\d+)", text):
            found[int(index)] = (_address(local), _address(remote))
        kernel = udp_sockets(self.nodes[node])
        for local, remote in found.values():
            assert kernel.get(local) == remote, f"{local}: QEMU's id says {remote}, the kernel {kernel.get(local)}"
        return found


def _address(text: str) -> tuple[str, int]:
    ip, port = text.split("-")
    return ".".join(str(b) for b in bytes.fromhex(ip)), int(port)


def udp_sockets(node: Node) -> dict[tuple[str, int], tuple[str, int] | None]:
    """Bound UDP sockets of the node's namespace: local -> connected peer (None: not connected)."""
    out = subprocess.run([*node.enter(), "cat", "/proc/net/udp"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines()[1:]:
        local, remote = line.split()[1:3]
        found[_hexaddr(local)] = None if remote == "00000000:0000" else _hexaddr(remote)
    return found


def _hexaddr(text: str) -> tuple[str, int]:
    ip, port = text.split(":")
    return ".".join(str(b) for b in reversed(bytes.fromhex(ip))), int(port, 16)


@pytest.fixture(scope="module")
def lab():
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/tmp"))
    cluster = Cluster(workdir / "cluster", PEER / "qemu-server-readconfig")
    started: list = []
    try:
        nodes = {}
        for name in UNDERLAY:
            ovs = start_ovs(f"{PREFIX}{name[-1]}")
            started.append(ovs)
            nodes[name] = cluster.add_node(name, netns=ovs.netns, ovsdb=ovs.remote)
        one, two = (started[0], started[1])
        veth = f"{PREFIX}{workdir.name[-5:]}"
        one.ip("link", "add", veth, "type", "veth", "peer", "name", veth, "netns", two.netns)
        for ovs, address in zip((one, two), UNDERLAY.values()):
            ovs.ip("addr", "add", f"{address}/24", "dev", veth)
            ovs.ip("link", "set", veth, "up")
        (cluster.pve / "corosync.conf").write_text(COROSYNC)
        made = Lab(cluster, nodes, started)
        for name in UNDERLAY:
            made.cli(name, "install-hook")
        yield made
    finally:
        kill_leftovers(cluster)
        for thing in reversed(started):
            thing.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def ends_of(lab: Lab, vmid: int) -> dict[str, dict]:
    """The spec file's link sections of VM `vmid`, by NIC."""
    text = (lab.cluster.pve / "pve-vhost-agent" / f"{vmid}.cfg").read_text()
    found = {}
    for block in text.strip().split("\n\n"):
        header, *props = block.splitlines()
        found[header.split("-")[-1]] = dict(p.strip().split(" ", 1) for p in props)
    return found


def test_ends_start_in_any_order_get_connected_sockets_and_follow_a_migration(lab):
    a = lab.vm("pve1", "leaf1")
    b = lab.vm("pve1", "leaf2")
    c = lab.vm("pve2", "spine1")
    lab.cli("pve1", "link", "add", f"{a}:net2", f"{b}:net3")
    out = lab.cli("pve1", "link", "add", f"{a}:net4", f"{c}:net1").stdout
    assert f"VM {c} is on node pve2" not in out  # not enabled yet: it says how to enable it
    for vmid, node in ((a, "pve1"), (b, "pve1"), (c, "pve2")):
        lab.cli(node, "enable", str(vmid))
    ab, ac = ends_of(lab, a)["net2"], ends_of(lab, a)["net4"]
    pa2, pb3, pa4, pc1 = int(ab["port"]), int(ab["peer-port"]), int(ac["port"]), int(ac["peer-port"])
    assert sorted((pa2, pb3, pa4, pc1)) == [20000, 20001, 20002, 20003]
    assert ab["mtu"] == "1458"  # an IPv4 cluster: what a 1500-byte underlay carries whole

    # b starts first: its peer does not run, its end is simply dark (no refusal, no wait).
    started_b = lab.qm("pve1").start(b)
    assert lab.sockets("pve1", b) == {3: (("127.0.0.1", pb3), ("127.0.0.1", pa2))}
    assert f"link net3 to {a}:net2 on this node" in started_b.task.text
    started_c = lab.qm("pve2").start(c)
    assert lab.sockets("pve2", c) == {1: (("10.0.11.2", pc1), ("10.0.11.1", pa4))}
    started_a = lab.qm("pve1").start(a)
    assert lab.sockets("pve1", a) == {2: (("127.0.0.1", pa2), ("127.0.0.1", pb3)),
                                      4: (("10.0.11.1", pa4), ("10.0.11.2", pc1))}
    assert f"connect link net4 to {c}:net1 on pve2 (10.0.11.1:{pa4} -> 10.0.11.2:{pc1})" in started_a.task.text
    status = json.loads(lab.cli("pve1", "status", "--json").stdout)
    assert (status["link_ends"], status["links_connected"]) == (3, 3)
    assert "3 link ends (3 connected)" in lab.cli("pve1", "status").stdout

    # a moves to pve2 while it runs: its target's post-start binds its ends there ...
    moved = migrate(lab.qm("pve1"), lab.qm("pve2"), a)
    assert moved.node == "pve2"
    assert lab.sockets("pve2", a) == {2: (("10.0.11.2", pa2), ("10.0.11.1", pb3)),
                                      4: (("127.0.0.1", pa4), ("127.0.0.1", pc1))}
    # ... and each node's service re-points the peers on it, without restarting them.
    assert "re-point link net3" in lab.cli("pve1", "service", "--once").stderr
    assert "re-point link net1" in lab.cli("pve2", "service", "--once").stderr
    assert lab.sockets("pve1", b) == {3: (("10.0.11.1", pb3), ("10.0.11.2", pa2))}
    assert lab.sockets("pve2", c) == {1: (("127.0.0.1", pc1), ("127.0.0.1", pa4))}
    assert lab.qm("pve1").pid(b) == started_b.pid and lab.qm("pve2").pid(c) == started_c.pid
    assert "would:" not in lab.cli("pve2", "service", "--dry-run").stdout  # nothing left to do
    listed = json.loads(lab.cli("pve2", "link", "list", "--json").stdout)
    states = {end["end"]: end["state"] for link in listed["links"] for end in link["ends"]}
    assert states == {f"{a}:net2": "connected", f"{a}:net4": "connected", f"{c}:net1": "connected",
                      f"{b}:net3": "on node pve1"}

    # Removing a link disconnects both running ends at once (their ports are free again).
    out = lab.cli("pve2", "link", "remove", f"{c}:net1").stdout
    assert f"VM {a}: disconnect link net4 (no link is declared on it any more) (running VM, at once)" in out
    assert f"VM {c}: disconnect link net1" in out and f"VM {a}: args written as a pending change" in out
    assert lab.sockets("pve2", a) == {2: (("10.0.11.2", pa2), ("10.0.11.1", pb3))} and lab.sockets("pve2", c) == {}
    assert ("127.0.0.1", pa4) not in udp_sockets(lab.nodes["pve2"])
    for node, vmid in (("pve2", a), ("pve1", b), ("pve2", c)):
        lab.qm(node).stop(vmid)
    assert udp_sockets(lab.nodes["pve1"]) == {} and udp_sockets(lab.nodes["pve2"]) == {}


def test_a_link_added_to_running_vms_comes_with_their_next_start(lab):
    a = lab.vm("pve1", "r1")
    b = lab.vm("pve1", "r2")
    for vmid in (a, b):
        lab.cli("pve1", "enable", str(vmid))
        lab.qm("pve1").start(vmid)
    out = lab.cli("pve1", "link", "add", f"{a}:net5", f"{b}:net6").stdout
    assert f"VM {a} is running: link end net5 comes with its next start" in out
    assert f"VM {a}: args written as a pending change" in out
    assert lab.sockets("pve1", a) == {}
    service = lab.cli("pve1", "service", "--once")
    assert f"VM {a} net5: the link to {b}:net6 waits for the VM's next start" in service.stderr
    status = json.loads(lab.cli("pve1", "status", "--json").stdout)
    assert any(f"VM {b} net6" in line for line in status["at_next_start"]), status
    lab.qm("pve1").stop(a)
    lab.qm("pve1").start(a)  # a cold start applies the pending args: the end is there now
    port = int(ends_of(lab, a)["net5"]["port"])
    assert lab.sockets("pve1", a) == {5: (("127.0.0.1", port), ("127.0.0.1", port + 1))}
    for vmid in (a, b):
        lab.qm("pve1").stop(vmid)


def test_link_add_refuses_what_a_vhost_user_nic_would_be_refused(lab):
    a = lab.vm("pve1", "r3", "net0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n")
    b = lab.vm("pve1", "r4", "args: -device e1000,bus=pci.0,addr=0x14\n")
    lab.cli("pve1", "enable", str(b))
    taken = lab.cli("pve1", "link", "add", f"{a}:net0", f"{b}:net1", code=4).stderr
    assert "already has `net0: virtio=BC:24:11:00:00:01,bridge=vmbr0`" in taken
    slot = lab.cli("pve1", "link", "add", f"{a}:net1", f"{b}:net2", code=4).stderr
    assert "takes pci.0 slot 0x14, the slot of the agent's vhu-net2" in slot
    assert not (lab.cluster.pve / "pve-vhost-agent" / f"{a}.cfg").exists()
    assert "is not a link end" in lab.cli("pve1", "link", "add", f"{a}-net1", f"{b}:net1", code=2).stderr


def test_a_start_warns_when_the_cluster_network_cannot_carry_a_whole_guest_frame(lab):
    a = lab.vm("pve1", "r5")
    b = lab.vm("pve2", "r6")
    lab.cli("pve1", "link", "add", f"{a}:net1", f"{b}:net1", "--mtu", "1500")
    lab.cli("pve1", "enable", str(a))
    # The doctor says it before any start, with the same figures (from the node's own underlay).
    report = json.loads(lab.cli("pve1", "doctor", "--json", code=None).stdout)
    [finding] = [f for f in report["findings"] if f["check"] == "link-underlay-mtu"]
    assert finding["severity"] == "warning" and finding["subject"] == f"VM {a} net1", finding
    assert re.search(rf"needs an underlay MTU of 1542 .*, but {PREFIX}\w+ has 1500", finding["problem"]), finding
    assert "re-add the link with --mtu 1458" in finding["fix"]
    started = lab.qm("pve1").start(a)  # a warning, not a refusal: fragments still arrive, slowly
    assert re.search(f"the link to {b}:net1 has guest MTU 1500, which needs an underlay MTU of 1542 "
                     rf"\(IPv4: 42 bytes of tunnel\), but {PREFIX}\w+ has 1500", started.task.text), started.task.text
    assert "re-add the link with --mtu 1458" in started.task.text
    lab.qm("pve1").stop(a)


def test_a_node_whose_vms_have_only_link_ends_needs_no_open_vswitch(lab):
    """Link ends are QEMU's own sockets: with no OVSDB to reach (a node without Open
    vSwitch), their VMs start, connect, stop and clean up, and status is clean."""
    a, b = lab.vm("pve1", "r1"), lab.vm("pve1", "r2")
    lab.cli("pve1", "link", "add", f"{a}:net1", f"{b}:net1")
    real = lab.nodes["pve1"]
    lab.nodes["pve1"] = dataclasses.replace(real, ovsdb=f"unix:{lab.cluster.pve.parent}/no-ovsdb.sock")
    try:
        for vmid in (a, b):
            lab.cli("pve1", "enable", str(vmid))
            lab.qm("pve1").start(vmid)
        assert set(lab.sockets("pve1", a)) == {1} and set(lab.sockets("pve1", b)) == {1}
        status = lab.cli("pve1", "status")  # exit 0: nothing here needs Open vSwitch
        # (the lab's VMs of earlier tests are stopped)
        assert re.match(r"\d+ VMs \(2 running\): Open vSwitch not needed, 2 link ends \(2 connected\); ", status.stdout)
        assert " ok; 0 problems" in status.stdout
        for vmid in (a, b):
            task = lab.qm("pve1").stop(vmid)
            assert [(run.phase, run.returncode) for run in task.hooks] == [("pre-stop", 0), ("post-stop", 0)], task.text
    finally:
        lab.nodes["pve1"] = real
