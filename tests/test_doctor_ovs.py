"""The host network doctor against real Open vSwitch and OVS-DPDK: a node whose VM declares a
QinQ vhost-user NIC, clean (exit 0), then one fault at a time, each named by `doctor`.

The doctor runs as a user runs it (the CLI, `--json`), inside the private ovs-vswitchd's
network namespace, so the links it reads are that switch's: a veth `drup0` is the uplink of
the vhost-user bridge. Files (/etc/network/interfaces, dpkg's status file, the ovs-vswitchd
alternative, the VM configs and declarations) live in a private root; /proc and /sys are
the host's. Bonds and VLAN-aware bridges need a kernel this machine does not have: they are
in tests/test_doctor_real_kernel.py.
"""

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fixtures.ovs import run, start_ovs
from pve_vhost_agent.formats.specfile import format_spec
from pve_vhost_agent.model.spec import ClusterSpec, QinQ, TapQinQ, VhostNic, VlanPolicy

REPO = Path(__file__).resolve().parents[1]
NODE = "pve1"
BRIDGE, UPLINK = "drvh0", "drup0"
DPDK_VSWITCHD = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
HOOK = "hookscript: local:snippets/pve-vhost-agent\n"
ROUTER = "balloon: 0\nboot: order=scsi0\nmemory: 2048\nname: router\n"
QINQ_NIC = VhostNic(100, 1, BRIDGE, "02:00:00:00:01:01", vlan=VlanPolicy(qinq=QinQ(950)))
DPKG = ("Package: openvswitch-switch-dpdk\nStatus: install ok installed\n\n"
        "Package: librte-mempool-ring23\nStatus: install ok installed\n")


class Node:
    def __init__(self, root: Path, ovs):
        self.root, self.ovs = root, ovs

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def write(self, host_path: str, text: str) -> None:
        self.path(host_path).parent.mkdir(parents=True, exist_ok=True)
        self.path(host_path).write_text(text)

    def declare(self, vmid: int, spec: ClusterSpec) -> None:
        self.write(f"/etc/pve/pve-vhost-agent/{vmid}.cfg", format_spec(spec))

    def vm(self, vmid: int, text: str) -> None:
        self.write(f"/etc/pve/nodes/{NODE}/qemu-server/{vmid}.conf", text)

    def doctor(self, ovs=None, ovsdb: str | None = None) -> tuple[int, list[dict]]:
        ovs = ovs or self.ovs
        done = subprocess.run(["ip", "netns", "exec", ovs.netns, "/usr/bin/python3", "-m", "pve_vhost_agent",
                               "--root", str(self.root), "--ovsdb", ovsdb or ovs.remote, "--node", NODE,
                               "doctor", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode in (0, 11), done.stdout + done.stderr
        return done.returncode, json.loads(done.stdout)["findings"]

    @contextlib.contextmanager
    def other_config(self, key: str, value: str | None):
        """Open_vSwitch other_config:key is `value` (None: unset) for the block."""
        before = self.ovs.get("Open_vSwitch", ".", "other_config")["other_config"].get(key)
        for wanted in (value, before):
            if wanted is None:
                self.ovs.vsctl("remove", "Open_vSwitch", ".", "other_config", key)
            else:
                self.ovs.vsctl("set", "Open_vSwitch", ".", f"other_config:{key}={wanted}")
            if wanted is value:
                yield


def named(findings: list[dict], severity: str, subject: str, check: str) -> dict:
    match = [f for f in findings if (f["severity"], f["subject"], f["check"]) == (severity, subject, check)]
    assert match, json.dumps(findings, indent=1)
    return match[0]


def make_root() -> Path:
    root = Path(run("mktemp", "-d", "/tmp/h10dr-root-XXXXXX"))
    for name in ("proc", "sys"):
        (root / name).symlink_to(f"/{name}")
    return root


@pytest.fixture(scope="module")
def dpdk_switch():
    """A private OVS-DPDK set up as the README says (vlan-limit 2, pmd-maxsleep, per-port-memory),
    with the netdev bridge of the declared NIC and a veth uplink of MTU 1504."""
    inst = start_ovs("h10dr", dpdk=True, other_config={"vlan-limit": "2"})
    try:
        inst.vsctl("add-br", BRIDGE, "--", "set", "Bridge", BRIDGE, "datapath_type=netdev")
        inst.plug_namespace(UPLINK, f"{inst.netns}-far")
        inst.ip("link", "set", UPLINK, "mtu", "1504")
        inst.vsctl("add-port", BRIDGE, UPLINK)
        yield inst
    finally:
        inst.stop()


@pytest.fixture
def node(dpdk_switch):
    """VM 100 with the agent's hookscript and a QinQ vhost-user NIC; everything in place."""
    root = make_root()
    n = Node(root, dpdk_switch)
    n.write("/etc/network/interfaces", f"auto lo\niface lo inet loopback\n\nauto {UPLINK}\n"
                                       f"iface {UPLINK} inet manual\n\tmtu 1504\n")
    n.write("/var/lib/dpkg/status", DPKG)
    n.path("/etc/alternatives").mkdir(parents=True)
    n.path("/etc/alternatives/ovs-vswitchd").symlink_to(DPDK_VSWITCHD)
    n.vm(100, ROUTER + HOOK)
    n.declare(100, ClusterSpec(nics=(QINQ_NIC,)))
    yield n
    shutil.rmtree(root)


def test_a_ready_node_exits_0(node):
    code, findings = node.doctor()
    assert code == 0 and {f["severity"] for f in findings} <= {"info"}, json.dumps(findings, indent=1)


def test_an_uplink_without_room_for_the_s_tag(node):
    node.ovs.ip("link", "set", UPLINK, "mtu", "1500")
    try:
        code, findings = node.doctor()
    finally:
        node.ovs.ip("link", "set", UPLINK, "mtu", "1504")
    found = named(findings, "error", "VM 100 net1", "mtu-ovs-uplink")
    assert code == 11 and found["problem"] == (
        f"uplink {UPLINK} of bridge {BRIDGE} has MTU 1500, but the NIC's frames need 1504 (MTU 1500 + 4 for the "
        "S-tag): full-size frames are dropped")


@pytest.mark.parametrize("key, value, severity, check", [
    ("dpdk-init", None, "error", "dpdk-init"),
    ("vlan-limit", "1", "error", "ovs-vlan-limit"),
    ("pmd-maxsleep", None, "warning", "dpdk-pmd-maxsleep"),  # this machine is a small host (2 CPUs)
    ("per-port-memory", None, "warning", "dpdk-per-port-memory"),
])
def test_an_ovs_setting_the_declared_nics_need(node, key, value, severity, check):
    with node.other_config(key, value):
        code, findings = node.doctor()
    found = named(findings, severity, f"Open vSwitch other_config:{key}", check)
    assert code == (11 if severity == "error" else 0) and found["fix"].startswith("ovs-vsctl set Open_vSwitch .")


def test_the_ovs_vswitchd_alternative_is_not_the_dpdk_build(node):
    node.path("/etc/alternatives/ovs-vswitchd").unlink()
    node.path("/etc/alternatives/ovs-vswitchd").symlink_to("/usr/lib/openvswitch-switch/ovs-vswitchd")
    found = named(node.doctor()[1], "error", "ovs-vswitchd", "dpdk-alternative")
    assert "update-alternatives --set ovs-vswitchd " + DPDK_VSWITCHD in found["fix"]


def test_dpdks_ring_mempool_driver_is_missing(node):
    node.write("/var/lib/dpkg/status", DPKG.split("\n\n")[0] + "\n\nPackage: librte-mempool-ring23\n"
                                                                "Status: deinstall ok config-files\n")
    found = named(node.doctor()[1], "error", "package librte-mempool-ring*", "dpdk-mempool-ring")
    assert found["fix"].startswith("apt install librte-mempool-ring23")


def test_open_vswitch_unreachable_with_nics_declared(node):
    code, findings = node.doctor(ovsdb=f"unix:{node.root}/no-such.sock")
    assert code == 11
    assert named(findings, "error", "Open vSwitch", "ovs-unreachable")["problem"].startswith(
        f"cannot reach OVSDB at unix:{node.root}/no-such.sock")


def test_a_vhost_user_nic_on_a_bridge_of_the_kernel_datapath(node):
    node.ovs.vsctl("add-br", "drsys0")  # datapath_type system (this kernel cannot run it; the row is there)
    node.declare(100, ClusterSpec(nics=(VhostNic(100, 1, "drsys0", "02:00:00:00:01:01"),)))
    try:
        named(node.doctor()[1], "error", "VM 100 net1", "vhost-bridge-datapath")
    finally:
        node.ovs.vsctl("del-br", "drsys0")


def test_a_hugepage_vm_the_host_cannot_reserve_pages_for(node):
    node.vm(100, ROUTER.replace("memory: 2048", "memory: 4194304") + HOOK + "numa: 1\nhugepages: 1024\n")  # 4 TiB
    found = named(node.doctor()[1], "warning", "VM 100", "hugepages")
    assert found["problem"].startswith("needs 4096 1024 MiB hugepages but 0 are free")


def test_declarations_for_a_vm_that_is_gone(node):
    node.declare(555, ClusterSpec(nics=(VhostNic(555, 2, BRIDGE, "02:00:00:00:05:02"),)))
    assert named(node.doctor()[1], "warning", "VM 555", "spec-without-vm")["fix"] == \
        "remove the file: rm /etc/pve/pve-vhost-agent/555.cfg"


def test_the_agents_args_without_its_hookscript(node):
    node.vm(100, ROUTER + "args: -chardev socket,id=vhu-net1,path=/run/pve-vhost-agent/ovs/vm-100-1.sock,server=on,"
                          "wait=off -netdev type=vhost-user,id=vhu-net1,chardev=vhu-net1,vhostforce=on\n")
    found = named(node.doctor()[1], "error", "VM 100", "args-without-hookscript")
    assert "hookscript is unset" in found["problem"]


def test_a_switch_that_is_not_the_dpdk_build(node):
    plain = start_ovs("h10pl", other_config={"dpdk-init": "true", "vlan-limit": "2"})
    try:
        plain.vsctl("add-br", BRIDGE, "--", "set", "Bridge", BRIDGE, "datapath_type=netdev")
        found = named(node.doctor(plain)[1], "error", "ovs-vswitchd", "dpdk-binary")
    finally:
        plain.stop()
    assert found["problem"] == "the running ovs-vswitchd is not the DPDK build: vhost-user ports cannot be made"


def test_dpdk_that_failed_to_initialise(node):
    broken = start_ovs("h10try", dpdk=True, other_config={"dpdk-init": "try", "dpdk-extra": "--no-pci --bogus-option",
                                                          "vlan-limit": "2"})
    try:
        broken.wait_for_log("DPDK Initialization Failed")
        code, findings = node.doctor(broken)
    finally:
        broken.stop()
    named(findings, "error", "Open vSwitch dpdk_initialized", "dpdk-initialized")
    assert not [f for f in findings if f["check"] == "dpdk-binary"]  # a DPDK build, whose DPDK failed


def test_a_datapath_probed_with_one_vlan_header(node):
    """vlan-limit raised at runtime (no restart): a Datapath row reports the depth probed before."""
    switch = start_ovs("h10vd")  # vlan-limit unset: the datapath probes one header
    try:
        switch.vsctl("add-br", "drq0", "--", "set", "Bridge", "drq0", "datapath_type=netdev")
        switch.wait_for_log("VLAN header stack length probed as 1")
        switch.vsctl("set", "Open_vSwitch", ".", "other_config:vlan-limit=2")
        switch.vsctl("--", "--id=@dp", "create", "Datapath", "datapath_version=0",
                     "--", "set", "Open_vSwitch", ".", "datapaths:netdev=@dp")
        deadline = time.monotonic() + 10
        while "max_vlan_headers" not in _capabilities(switch) and time.monotonic() < deadline:
            time.sleep(0.05)
        node.vm(100, ROUTER + HOOK + "net0: virtio=BC:24:11:00:00:01,bridge=drq0,tag=950\n")
        node.declare(100, ClusterSpec(tap_qinq=(TapQinQ(100, 0, QinQ(950)),)))
        code, findings = node.doctor(switch)
    finally:
        switch.stop()
    found = named(findings, "error", "Open vSwitch netdev datapath", "ovs-vlan-depth")
    assert code == 11 and found["problem"].startswith("was probed with 1 VLAN header ")


def _capabilities(switch) -> dict:
    uuid = switch.get("Open_vSwitch", ".", "datapaths")["datapaths"]["netdev"]
    return switch.get("Datapath", uuid, "capabilities")["capabilities"]
