"""The host network doctor on Debian 12's own kernel: a seed-style host built with netlink
(pyroute2), its /etc/network/interfaces, and one fault at a time, each named by `doctor`.

The host: an 802.3ad bond `bond0` of two veths with jumbo frames, whose LACP partner is
a second 802.3ad bond in another network namespace (`switch`); a VLAN-aware
bridge `vmbr0` on it with a VLAN device `vmbr0.50`; a NAT bridge `vmbr1` for private VMs
(declared in a sourced file); a VM config with a tagged NIC. Clean, `doctor` exits 0; each
test below breaks one thing in the kernel (or the file, or a VM config), asks the doctor,
and puts it back. The whole file runs in one guest (tests/fixtures/kernelvm.py), its own,
so the links carry a real host's names; the last test checks that the README's sample
report is what `doctor` prints here.
"""

import contextlib
import json
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS, netns

from builders import SEED_MAIN, SEED_NAT
from pvestandin.layout import mark_pmxcfs
from pve_vhost_agent.flows.doctor import run_doctor
from pve_vhost_agent.settings import DEFAULT_OVSDB, Settings

pytestmark = pytest.mark.real_kernel(releases=("bookworm", "trixie"))

CHECKOUT = Path(__file__).resolve().parents[1]
PEER = "switch"  # the LACP partner's namespace
NODE = "pve1"
LACP = 4  # bond mode 802.3ad
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
VM_NIC = "virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=20"
INTERFACES = SEED_MAIN.replace("bridge-vids 2-4094", "bridge-vids 10 20 50")  # a VLAN at a time here
NAT = SEED_NAT


class Host:
    """The seed host in the guest: links, a root folder for the doctor, and fault helpers."""

    def __init__(self, ipr: IPRoute, peer: NetNS, root: Path):
        self.ipr, self.peer, self.root = ipr, peer, root
        self.settings = Settings(root=root, ovsdb=DEFAULT_OVSDB, node=NODE)  # no Open vSwitch in the guest

    def index(self, name: str, ns=None) -> int:
        found = (ns or self.ipr).link_lookup(ifname=name)
        assert found, f"no link {name}"
        return found[0]

    def set(self, name: str, ns=None, **attrs) -> None:
        (ns or self.ipr).link("set", index=self.index(name, ns), **attrs)

    def bond_info(self) -> dict:
        data = self.ipr.get_links(self.index("bond0"))[0].get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        return dict(data.get_attr("IFLA_BOND_AD_INFO")["attrs"])

    def doctor(self):
        return run_doctor(self.settings)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["/usr/bin/python3", "-m", "pve_vhost_agent", "--root", str(self.root), "--ovsdb",
                               self.settings.ovsdb, "--node", NODE, "doctor", *args],
                              cwd=CHECKOUT, capture_output=True, text=True, timeout=120)

    @contextlib.contextmanager
    def file(self, path: str, text: str):
        """The file under the root holds `text` for the block."""
        target = self.root / path.lstrip("/")
        before = target.read_text() if target.exists() else None
        target.write_text(text)
        try:
            yield
        finally:
            if before is None:
                target.unlink()
            else:
                target.write_text(before)


def named(host: Host, severity: str, subject: str, check: str, timeout: float = 0.0):
    """The finding (severity, subject, check), asking again until `timeout` (LACP takes seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        findings = host.doctor()
        match = [f for f in findings if (f.severity.value, f.subject, f.check) == (severity, subject, check)]
        if match or time.monotonic() >= deadline:
            assert match, "\n".join(str(f) for f in findings) or "no findings"
            return match[0]
        time.sleep(0.5)


def wait_clean(host: Host, timeout: float = 20.0) -> None:
    """Until the doctor has no error or warning (after a fault is undone: LACP renegotiates)."""
    deadline = time.monotonic() + timeout
    while True:
        bad = [str(f) for f in host.doctor() if f.severity.value != "info"]
        if not bad:
            return
        assert time.monotonic() < deadline, "\n".join(bad)
        time.sleep(0.5)


def peer_bond(peer: NetNS, name: str, *slaves: str) -> None:
    peer.link("add", ifname=name, kind="bond", bond_mode=LACP, bond_miimon=100, bond_ad_lacp_rate=1)
    for slave in slaves:
        peer.link("set", index=peer.link_lookup(ifname=slave)[0], state="down")
        peer.link("set", index=peer.link_lookup(ifname=slave)[0], master=peer.link_lookup(ifname=name)[0])
        peer.link("set", index=peer.link_lookup(ifname=slave)[0], state="up")
    peer.link("set", index=peer.link_lookup(ifname=name)[0], state="up")


@pytest.fixture(scope="module")
def host():
    netns.create(PEER)
    root = Path(tempfile.mkdtemp(prefix="drroot-"))
    (root / "etc/network/interfaces.d").mkdir(parents=True)
    (root / "etc/network/interfaces").write_text(INTERFACES)
    (root / "etc/network/interfaces.d/nat").write_text(NAT)
    vms = root / "etc/pve/nodes" / NODE / "qemu-server"
    vms.mkdir(parents=True)
    mark_pmxcfs(root / "etc/pve")
    (vms / "100.conf").write_text(f"memory: 2048\nname: web\nnet0: {VM_NIC}\n")
    for name in ("proc", "sys"):
        (root / name).symlink_to(f"/{name}")
    with IPRoute() as ipr, NetNS(PEER) as peer:
        h = Host(ipr, peer, root)
        ipr.link("add", ifname="bond0", kind="bond", bond_mode=LACP, bond_miimon=100, bond_ad_lacp_rate=1,
                 bond_xmit_hash_policy=1)
        for n in (1, 2):
            ipr.link("add", ifname=f"eno{n}", kind="veth", peer=f"swp{n}")
            h.set(f"swp{n}", net_ns_fd=PEER)
            h.set(f"eno{n}", master=h.index("bond0"))
        h.set("bond0", mtu=9000)  # the slaves follow
        for n in (1, 2):
            h.set(f"swp{n}", ns=peer, mtu=9000)
        peer_bond(peer, "po1", "swp1", "swp2")
        ipr.link("add", ifname="vmbr0", kind="bridge", br_vlan_filtering=1, br_stp_state=0, br_forward_delay=0)
        h.set("bond0", master=h.index("vmbr0"))
        for vid in (10, 20, 50):
            ipr.vlan_filter("add", index=h.index("bond0"), vlan_info={"vid": vid})
        h.set("vmbr0", mtu=9000)
        ipr.link("add", ifname="vmbr0.50", kind="vlan", link=h.index("vmbr0"), vlan_id=50)
        ipr.link("add", ifname="vmbr1", kind="bridge", br_stp_state=0, br_forward_delay=0)
        for name in ("eno1", "eno2", "bond0", "vmbr0", "vmbr0.50", "vmbr1"):
            h.set(name, state="up")
        IP_FORWARD.write_text("1")
        wait_clean(h)
        yield h
        for name in ("vmbr0.50", "vmbr0", "vmbr1", "bond0", "eno1", "eno2", "bond0.100"):
            if ipr.link_lookup(ifname=name):
                ipr.link("del", index=h.index(name))
    netns.remove(PEER)


def test_the_clean_seed_host_exits_0(host):
    done = host.cli("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert {f["severity"] for f in report["findings"]} <= {"info"}, report
    assert host.bond_info()["IFLA_BOND_AD_INFO_NUM_PORTS"] == 2  # a real LACP partner


# --- file against kernel ---------------------------------------------------------------------


def test_an_auto_interface_the_kernel_lacks(host):
    with host.file("/etc/network/interfaces.d/extra", "auto eno3\niface eno3 inet manual\n\tmtu 9000\n"):
        found = named(host, "error", "eno3", "drift-missing")
    assert found.problem.startswith("/etc/network/interfaces.d/extra:2 declares eno3 (auto)")


def test_a_bond_mode_that_differs(host):
    with host.file("/etc/network/interfaces", INTERFACES.replace("bond-mode 802.3ad", "bond-mode active-backup")):
        found = named(host, "warning", "bond0", "drift-bond-mode")
    assert "declares bond-mode active-backup, but the kernel runs bond-mode 802.3ad" in found.problem


def test_a_slave_set_that_differs(host):
    host.set("eno2", state="down")
    host.set("eno2", master=0)
    try:
        found = named(host, "warning", "bond0", "drift-bond-slaves")
        assert "declares bond-slaves eno1 eno2, but the kernel runs slaves eno1" in found.problem
    finally:
        host.set("eno2", master=host.index("bond0"))
        host.set("eno2", state="up")
    wait_clean(host)


def test_an_mtu_that_differs(host):
    host.set("vmbr0.50", mtu=1500)
    try:
        found = named(host, "warning", "vmbr0.50", "drift-mtu")
        assert "declares MTU 9000, but the kernel runs MTU 1500" in found.problem
    finally:
        host.set("vmbr0.50", mtu=9000)


def test_a_vlan_id_that_differs(host):
    """`bond0.60` declared (a dotted name: VLAN 60 on bond0), made by hand with id 61."""
    host.ipr.link("add", ifname="bond0.60", kind="vlan", link=host.index("bond0"), vlan_id=61)
    try:
        with host.file("/etc/network/interfaces.d/vlan", "auto bond0.60\niface bond0.60 inet manual\n"):
            found = named(host, "warning", "bond0.60", "drift-vlan-id")
        assert "declares VLAN 60, but the kernel runs VLAN 61" in found.problem
    finally:
        host.ipr.link("del", index=host.index("bond0.60"))


# --- MTU chains ------------------------------------------------------------------------------------


def test_a_bond_slave_whose_mtu_differs_from_the_bond(host):
    host.set("eno1", mtu=1500)
    try:
        found = named(host, "error", "eno1", "mtu-bond-slave")
        assert found.problem.startswith("MTU 1500 differs from its bond bond0's MTU 9000")
    finally:
        host.set("eno1", mtu=9000)


def test_a_bridge_above_its_bond(host):
    """The file gives the bridge MTU 9000 but forgets the bond: ifupdown2 leaves the bond
    at 1500 (the bridge follows it down) and then sets the bridge to 9000."""
    host.set("bond0", mtu=1500)
    host.set("vmbr0", mtu=9000)
    try:
        found = named(host, "error", "vmbr0", "mtu-bridge-port")
        assert "bridge MTU 9000 is above the MTU 1500 of its port bond0" in found.problem
    finally:
        for name in ("bond0", "vmbr0", "vmbr0.50"):
            host.set(name, mtu=9000)
    wait_clean(host)


def test_an_s_tag_device_whose_uplink_lacks_four_bytes_for_the_c_tag(host):
    """An 802.1ad VLAN device with a C-tag device on it: frames leave bond0 with two tags."""
    s_tag = "bond0.100"
    host.ipr.link("add", ifname=s_tag, kind="vlan", link=host.index("bond0"), vlan_id=100, vlan_protocol=0x88A8)
    host.ipr.link("add", ifname=f"{s_tag}.10", kind="vlan", link=host.index(s_tag), vlan_id=10)
    stanzas = (f"auto {s_tag}\niface {s_tag} inet manual\n\tvlan-protocol 802.1ad\n"
               f"auto {s_tag}.10\niface {s_tag}.10 inet manual\n")
    try:
        with host.file("/etc/network/interfaces.d/qinq", stanzas):
            found = named(host, "warning", f"{s_tag}.10", "mtu-qinq")
        assert "which needs MTU 9004 there, but bond0 has 9000" in found.problem
    finally:
        host.ipr.link("del", index=host.index(s_tag))


# --- bonds ---------------------------------------------------------------------------------------------


def test_a_bond_slave_without_carrier(host):
    host.set("swp2", ns=host.peer, state="down")  # the switch port goes down
    try:
        found = named(host, "warning", "eno2", "bond-slave-down", timeout=5)
        assert "slave of bond0 has no carrier" in found.problem
    finally:
        host.set("swp2", ns=host.peer, state="up")
    wait_clean(host)


def test_an_802_3ad_bond_without_lacp_partner(host):
    """The "switch" stops speaking LACP: its ports leave its bond (they stay up)."""
    for port in ("swp1", "swp2"):
        host.set(port, ns=host.peer, master=0)
        host.set(port, ns=host.peer, state="up")
    try:
        found = named(host, "error", "bond0", "bond-lacp-partner", timeout=15)
        assert "the switch does not answer LACP on eno1, eno2" in found.problem
    finally:
        for port in ("swp1", "swp2"):
            host.set(port, ns=host.peer, state="down")
            host.set(port, ns=host.peer, master=host.index("po1", host.peer))
            host.set(port, ns=host.peer, state="up")
    wait_clean(host)


def test_802_3ad_slaves_in_different_aggregators(host):
    """The two ports end on two port-channels of the "switch" (two bonds)."""
    host.set("swp2", ns=host.peer, state="down")
    host.set("swp2", ns=host.peer, master=0)
    peer_bond(host.peer, "po2", "swp2")
    try:
        found = named(host, "warning", "eno2", "bond-lacp-aggregator", timeout=15)
        assert "not in the active aggregator" in found.problem
    finally:
        host.peer.link("del", index=host.index("po2", host.peer))
        host.set("swp2", ns=host.peer, state="down")
        host.set("swp2", ns=host.peer, master=host.index("po1", host.peer))
        host.set("swp2", ns=host.peer, state="up")
    wait_clean(host)


def test_a_bond_with_miimon_0(host):
    host.set("bond0", kind="bond", bond_miimon=0)
    try:
        found = named(host, "warning", "bond0", "bond-miimon")
        assert "a failed link is never noticed" in found.problem
    finally:
        host.set("bond0", kind="bond", bond_miimon=100)


# --- bridges, VMs and NAT ---------------------------------------------------------------------------------


def test_a_bridge_with_stp_and_a_forward_delay(host):
    host.set("vmbr1", kind="bridge", br_stp_state=1, br_forward_delay=1500)
    try:
        found = named(host, "warning", "vmbr1", "bridge-stp-delay")
        assert "STP is on with a forward delay of 15 s" in found.problem
    finally:
        host.set("vmbr1", kind="bridge", br_stp_state=0)  # then the delay: with STP on, 2-30 s only
        host.set("vmbr1", kind="bridge", br_forward_delay=0)


def test_a_vm_tag_outside_the_bridge_vids(host):
    with host.file(f"/etc/pve/nodes/{NODE}/qemu-server/100.conf", f"memory: 2048\nnet0: {VM_NIC.replace('20', '30')}\n"):
        found = named(host, "error", "VM 100 net0", "vm-tag-outside-vids")
    assert found.problem.startswith("VLAN 30 is not among the VLANs vmbr0 carries (bridge-vids 10,20,50)")


def test_a_nat_bridge_without_ip_forward_and_the_cli_exit_code(host):
    IP_FORWARD.write_text("0")
    try:
        found = named(host, "error", "vmbr1", "nat-forwarding")
        done = host.cli()
    finally:
        IP_FORWARD.write_text("1")
    assert "net.ipv4.ip_forward is 0" in found.problem
    assert done.returncode == 11, done.stdout + done.stderr
    assert f"{found}\n" in done.stdout and done.stdout.endswith("1 error, 0 warnings, 1 info\n"), done.stdout


def test_the_readme_sample_report_is_what_doctor_prints_here(host):
    """A few faults at once (a switch port down, NAT without forwarding, a VM tag the bridge
    does not carry, an MTU the kernel lost): the report, as the README shows it."""
    readme = (CHECKOUT / "README.md").read_text()
    sample = readme.split("    $ pve-vhost-agent doctor\n", 1)[1].split("\n\n", 1)[0]
    host.set("swp2", ns=host.peer, state="down")
    host.set("vmbr0.50", mtu=1500)
    IP_FORWARD.write_text("0")
    try:
        with host.file(f"/etc/pve/nodes/{NODE}/qemu-server/100.conf", f"memory: 2048\nnet0: {VM_NIC.replace('20', '30')}\n"):
            named(host, "warning", "eno2", "bond-slave-down", timeout=5)
            done = host.cli()
    finally:
        IP_FORWARD.write_text("1")
        host.set("vmbr0.50", mtu=9000)
        host.set("swp2", ns=host.peer, state="up")
    assert done.returncode == 11
    assert done.stdout == "".join(line.removeprefix("    ") + "\n" for line in sample.splitlines()), done.stdout
    wait_clean(host)
