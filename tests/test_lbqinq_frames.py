"""QinQ on Proxmox's tap NICs of Linux bridges, proved with frames on Debian's own kernel.

The whole file runs in one real-kernel guest (tests/fixtures/kernelvm.py). Each test
builds a Proxmox host's network with pyroute2: a Linux bridge vmbr0 (VLAN-aware or
traditional) whose uplink is a bond of a veth, or a veth, and whose far end `kvw1` is
the wire a test reads and writes. QEMU's taps are real taps held open through
/dev/net/tun (tests/fixtures/tapdev.py: closing one is QEMU's exit), plugged as
pve-common's tap_plug plugs them (PveBridge below). The agent runs as Proxmox runs it:
the hook phases through `run_hook`, the service as one pass, against a private Proxmox
root with the VM configs and the spec written by `qinq set`'s own code. No Open vSwitch
runs here: a VM whose QinQ is all on Linux bridges must not need it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from fixtures.fakeqemu import start_fake_qemu
from fixtures.frames import capture_socket, collect, frame, mac, tag_text
from fixtures.tapdev import GuestTap
from pvestandin.layout import mark_pmxcfs
from pve_vhost_agent.flows import declare
from pve_vhost_agent.flows.hook import run_hook
from pve_vhost_agent.flows.service import Service
from pve_vhost_agent.model.spec import EtherType, QinQ
from pve_vhost_agent.settings import Settings

pytestmark = pytest.mark.real_kernel

Q, AD = 0x8100, 0x88A8
NODE = "pve1"
HOOK = "hookscript: local:snippets/pve-vhost-agent\n"
TEST_LINKS = ("kv", "vmbr0", "tap1", "bond0")  # what a test makes starts with one of these


def vid_range(first: int, last: int) -> dict:
    """VLAN ids first-last for `bridge vlan add|del` through pyroute2 (IFLA_AF_SPEC)."""
    return {"attrs": [["IFLA_BRIDGE_VLAN_INFO", {"vid": first, "flags": 0x8}],  # range begin
                      ["IFLA_BRIDGE_VLAN_INFO", {"vid": last, "flags": 0x10}]]}  # range end


class PveBridge:
    """pve-common's tap_plug/tap_unplug for a Linux bridge (firewall off, no trunks, no rate):
    the tap gets the bridge's MTU; on a VLAN-aware bridge it loses every VLAN and gets
    `tag` untagged as PVID; on a traditional one it goes into <bridge>v<tag>, made with
    <uplink>.<tag> (802.1Q) when missing (activate_bridge_vlan)."""

    def __init__(self, ipr: IPRoute):
        self.ipr = ipr

    def index(self, name: str) -> int:
        found = self.ipr.link_lookup(ifname=name)
        assert found, f"no link {name}"
        return found[0]

    def data(self, name: str) -> dict:
        info = self.ipr.get_links(self.index(name))[0].get_attr("IFLA_LINKINFO")
        return dict(info.get_attr("IFLA_INFO_DATA")["attrs"]) if info.get_attr("IFLA_INFO_DATA") else {}

    def plug(self, tap: str, bridge: str, tag: int) -> None:
        mtu = self.ipr.get_links(self.index(bridge))[0].get_attr("IFLA_MTU")
        self.ipr.link("set", index=self.index(tap), mtu=mtu, state="up")
        if self.data(bridge).get("IFLA_BR_VLAN_FILTERING"):
            self.ipr.link("set", index=self.index(tap), master=self.index(bridge))
            self.ipr.vlan_filter("del", index=self.index(tap), IFLA_AF_SPEC=vid_range(1, 4094))
            self.ipr.vlan_filter("add", index=self.index(tap), vlan_info={"vid": tag, "flags": ["pvid", "untagged"]})
            return
        vlan_bridge = f"{bridge}v{tag}"
        if not self.ipr.link_lookup(ifname=vlan_bridge):
            self.ipr.link("add", ifname=vlan_bridge, kind="bridge")
        for port in self.physical_ports(bridge):
            name = f"{port}.{tag}"
            if not self.ipr.link_lookup(ifname=name):
                self.ipr.link("add", ifname=name, kind="vlan", link=self.index(port), vlan_id=tag)
            self.ipr.link("set", index=self.index(name), master=self.index(vlan_bridge), state="up")
        self.ipr.link("set", index=self.index(vlan_bridge), mtu=mtu, state="up")
        self.ipr.link("set", index=self.index(tap), master=self.index(vlan_bridge))

    def unplug(self, tap: str) -> None:
        self.ipr.link("set", index=self.index(tap), master=0)

    def physical_ports(self, bridge: str) -> list[str]:
        ports = []
        for msg in self.ipr.get_links():
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            if msg.get_attr("IFLA_MASTER") == self.index(bridge) and kind in (None, "bond", "vlan", "veth") \
                    and not msg.get_attr("IFLA_IFNAME").startswith("tap"):
                ports.append(msg.get_attr("IFLA_IFNAME"))
        return ports


class Host:
    """A Proxmox node: its root (VM configs, the spec), its network and its running VMs."""

    def __init__(self, ipr: IPRoute, root: Path):
        self.ipr, self.root = ipr, root
        self.pve = PveBridge(ipr)
        self.settings = Settings(root=root, node=NODE, ovs_timeout=2.0, lock_timeout=2.0)
        self.taps: dict[int, list[GuestTap]] = {}
        self.qemus = {}
        (root / "etc/pve/nodes" / NODE / "qemu-server").mkdir(parents=True)
        (root / "etc/pve/priv/lock").mkdir(parents=True)
        mark_pmxcfs(root / "etc/pve")

    def network(self, *, vlan_aware: bool, bond: bool, uplink_mtu: int = 1504) -> None:
        """vmbr0 (MTU 1500) whose uplink is bond0 (a veth slave) or the veth kvw0; kvw1 is the wire."""
        ipr = self.ipr
        ipr.link("add", ifname="vmbr0", kind="bridge", br_vlan_filtering=int(vlan_aware))
        ipr.link("add", ifname="kvw0", kind="veth", peer="kvw1")
        uplink = "kvw0"
        if bond:
            ipr.link("add", ifname="bond0", kind="bond", bond_mode=1, bond_miimon=100)
            ipr.link("set", index=self.pve.index("kvw0"), master=self.pve.index("bond0"))
            uplink = "bond0"
        for name in ("kvw1", "kvw0", uplink):
            ipr.link("set", index=self.pve.index(name), mtu=uplink_mtu, state="up")
        ipr.link("set", index=self.pve.index(uplink), master=self.pve.index("vmbr0"))
        if vlan_aware:  # ifupdown2's bridge-vids 2-4094 on the uplink
            ipr.vlan_filter("add", index=self.pve.index(uplink), IFLA_AF_SPEC=vid_range(2, 4094))
        ipr.link("set", index=self.pve.index("vmbr0"), mtu=1500, state="up")

    def vm(self, vmid: int, tag: int, qinq: QinQ | None = None) -> None:
        (self.root / "etc/pve/nodes" / NODE / "qemu-server" / f"{vmid}.conf").write_text(
            f"memory: 128\nname: vm{vmid}\nnet0: virtio=BC:24:11:00:{vmid % 100:02d}:01,bridge=vmbr0,tag={tag}\n{HOOK}")
        if qinq is not None:
            declare.set_tap_qinq(self.settings, vmid, "net0", qinq, dry_run=False)  # `qinq set`

    def hook(self, vmid: int, phase: str) -> int:
        return run_hook(self.settings, str(vmid), phase, {})

    def start(self, vmid: int, tag: int) -> GuestTap:
        """qm start: pre-start, QEMU opens its tap, pve-bridge plugs it, post-start."""
        assert self.hook(vmid, "pre-start") == 0
        tap = GuestTap(f"tap{vmid}i0")
        self.taps[vmid] = tap
        self.qemus[vmid] = start_fake_qemu(self.root / f"var/run/qemu-server/{vmid}.pid")
        self.pve.plug(tap.name, "vmbr0", tag)
        assert self.hook(vmid, "post-start") == 0
        return tap

    def stop(self, vmid: int) -> None:
        """The guest powers off: QEMU exits (its tap goes), then post-stop."""
        self.taps.pop(vmid).close()
        qemu = self.qemus.pop(vmid)
        qemu.kill()
        qemu.wait()
        assert self.hook(vmid, "post-stop") == 0

    def links(self) -> set[str]:
        return {msg.get_attr("IFLA_IFNAME") for msg in self.ipr.get_links()}

    def alias(self, name: str) -> str:
        return self.ipr.get_links(self.pve.index(name))[0].get_attr("IFLA_IFALIAS") or ""

    def master(self, name: str) -> str:
        master = self.ipr.get_links(self.pve.index(name))[0].get_attr("IFLA_MASTER")
        return self.ipr.get_links(master)[0].get_attr("IFLA_IFNAME") if master else ""

    def close(self) -> None:
        for tap in self.taps.values():
            tap.close()
        for qemu in self.qemus.values():
            qemu.kill()
            qemu.wait()


@pytest.fixture
def host():
    root = Path(tempfile.mkdtemp(prefix="lbq-root-"))
    with IPRoute() as ipr:
        node = Host(ipr, root)
        try:
            yield node
        finally:
            node.close()
            for msg in ipr.get_links():  # the agent's devices are named after vmbr0
                if msg.get_attr("IFLA_IFNAME").startswith(TEST_LINKS) and ipr.link_lookup(index=msg["index"]):
                    ipr.link("del", index=msg["index"])
            shutil.rmtree(root)


def wire_from(tap: GuestTap, *frames: bytes) -> list[str]:
    """The guest sends `frames`; the tags of those that reach the wire (the last must)."""
    with capture_socket("kvw1") as wire:
        for data in frames:
            tap.send(data)
        return [f"{f[6:12].hex()[-2:]}:{tag_text(f)}" for f in collect(wire, frames[-1][6:12])]


def guest_from(tap: GuestTap, *frames: bytes) -> list[str]:
    """The wire sends `frames`; the tags of those the guest receives (the last must)."""
    tap.drain()
    with capture_socket("kvw1") as wire:
        for data in frames:
            wire.send(data)
    return [f"{f[6:12].hex()[-2:]}:{tag_text(f)}" for f in tap.collect(frames[-1][6:12])]


def test_a_vlan_aware_bridge_with_a_bond_802_1ad_and_802_1q_s_tags_next_to_plain_tagged_vms(host, capsys):
    host.network(vlan_aware=True, bond=True)
    host.vm(100, 950, QinQ(950, (10, 20, 21, 22)))  # 802.1ad: an S-VLAN device on bond0
    host.vm(102, 960, QinQ(960, (), EtherType.DOT1Q))  # 802.1Q: through vmbr0's own VLAN 960
    host.vm(101, 20)  # Proxmox's own VLANs, untouched by the agent
    host.vm(103, 950)
    qinq_ad, qinq_q = host.start(100, 950), host.start(102, 960)
    plain_20, plain_950 = host.start(101, 20), host.start(103, 950)
    assert {"vmbr0a950", "vmbr0a950u", "vmbr0q960", "vmbr0q960u", "vmbr0q960t", "vmbr0q960p"} <= host.links()
    assert host.alias("tap100i0").startswith("pve-vhost-agent role=tap vmid=100 nic=net0 bridge=vmbr0 stag=950")
    assert [host.master(f"tap{vmid}i0") for vmid in (100, 102, 101)] == ["vmbr0a950", "vmbr0q960", "vmbr0"]
    said = capsys.readouterr().out
    assert "make Proxmox's tap100i0 a QinQ port: S-tag 950 (802.1ad), C-VLANs 10,20-22, in vmbr0a950" in said

    # 802.1ad S-tag with C-VLANs 10,20-22: untagged frames and other C-VLANs go nowhere.
    assert wire_from(qinq_ad, frame(mac(1)), frame(mac(2), (Q, 30)), frame(mac(3), (AD, 10)),
                     frame(mac(4), (Q, 0xA000 | 21)),  # PCP 5
                     frame(mac(5), (Q, 10))) == ["04:88a8/950 8100/21", "05:88a8/950 8100/10"]
    assert guest_from(qinq_ad, frame(mac(6), (AD, 950)), frame(mac(7), (AD, 950), (Q, 30)),
                      frame(mac(8), (AD, 951), (Q, 10)), frame(mac(9), (Q, 950), (Q, 10)),
                      frame(mac(10), (AD, 950), (Q, 20))) == ["0a:8100/20"]
    # 802.1Q S-tag through vmbr0's VLAN 960: everything, both ways, outer tag pushed and popped.
    assert wire_from(qinq_q, frame(mac(11)), frame(mac(12), (Q, 10))) == ["0b:8100/960", "0c:8100/960 8100/10"]
    assert guest_from(qinq_q, frame(mac(13), (Q, 961), (Q, 10)), frame(mac(14), (AD, 960), (Q, 10)),
                      frame(mac(15), (Q, 960), (Q, 10)), frame(mac(16), (Q, 960))) == ["0f:8100/10", "10:"]
    # Proxmox's VLANs 20 and 950 (802.1Q) work as before; 88a8/950 is not theirs.
    assert wire_from(plain_20, frame(mac(17))) == ["11:8100/20"]
    assert guest_from(plain_950, frame(mac(18), (AD, 950), (Q, 10)), frame(mac(19), (Q, 950))) == ["13:"]
    assert guest_from(plain_20, frame(mac(20), (Q, 20))) == ["14:"]

    report = Service(host.settings).check()
    assert report.summary()["qinq_taps"] == 2 and not report.plan.actions, report.plan.actions

    # `qinq remove` while VM 100 runs: its tap goes back to Proxmox's VLAN 950, then its
    # S-VLAN devices go (no QinQ tap uses them any more).
    declare.remove_tap_qinq(host.settings, 100, "net0", dry_run=False)
    Service(host.settings).run_pass()
    assert host.master("tap100i0") == "vmbr0" and host.alias("tap100i0") == ""
    assert wire_from(qinq_ad, frame(mac(21), (Q, 30)), frame(mac(22))) == ["16:8100/950"]
    Service(host.settings).run_pass()
    assert not {name for name in host.links() if name.startswith("vmbr0a")}

    host.stop(100)
    host.stop(102)
    assert not {name for name in host.links() if name.startswith(("vmbr0a", "vmbr0q"))}
    assert guest_from(plain_20, frame(mac(23), (Q, 20))) == ["17:"]


def test_a_traditional_bridge_keeps_proxmoxs_vlan_bridges_and_the_service_takes_a_replugged_tap_back(host):
    host.network(vlan_aware=False, bond=False)
    host.vm(100, 950, QinQ(950))  # 802.1ad: an S-VLAN device on the uplink kvw0
    host.vm(102, 960, QinQ(960, (10,), EtherType.DOT1Q))  # 802.1Q: Proxmox's vmbr0v960 already tunnels
    host.vm(101, 950)  # Proxmox's vmbr0v950 over kvw0.950 (802.1Q)
    qinq_ad, qinq_q, plain = host.start(100, 950), host.start(102, 960), host.start(101, 950)
    assert (host.master("tap100i0"), host.master("tap102i0"), host.master("tap101i0")) == (
        "vmbr0a950", "vmbr0v960", "vmbr0v950")

    assert wire_from(qinq_ad, frame(mac(1)), frame(mac(2), (Q, 10))) == ["01:88a8/950", "02:88a8/950 8100/10"]
    assert guest_from(qinq_ad, frame(mac(3), (Q, 950), (Q, 10)), frame(mac(4), (AD, 951), (Q, 10)),
                      frame(mac(5), (AD, 950), (Q, 10))) == ["05:8100/10"]
    assert wire_from(qinq_q, frame(mac(6)), frame(mac(7), (Q, 11)), frame(mac(8), (Q, 10))) == ["08:8100/960 8100/10"]
    assert guest_from(qinq_q, frame(mac(9), (Q, 960)), frame(mac(10), (Q, 960), (Q, 10))) == ["0a:8100/10"]
    assert guest_from(plain, frame(mac(11), (AD, 950)), frame(mac(12), (Q, 950))) == ["0c:"]

    # `qm set 100 --net0 ...,tag=951` on the running VM: Proxmox re-plugs the tap (no hook).
    conf = host.root / "etc/pve/nodes" / NODE / "qemu-server/100.conf"
    conf.write_text(conf.read_text().replace("tag=950", "tag=951"))
    host.pve.unplug("tap100i0")
    host.pve.plug("tap100i0", "vmbr0", 951)
    assert host.master("tap100i0") == "vmbr0v951"
    report = Service(host.settings).run_pass()
    assert host.master("tap100i0") == "vmbr0a950", report.line()
    assert "was=vmbr0v951" in host.alias("tap100i0") and report.summary()["qinq_taps"] == 2
    assert wire_from(qinq_ad, frame(mac(13), (Q, 10))) == ["0d:88a8/950 8100/10"]

    # `qinq set 102 net0 --qinq 960 --cvlans 10,11 --ethertype 802.1q` while it runs: new filters.
    declare.set_tap_qinq(host.settings, 102, "net0", QinQ(960, (10, 11), EtherType.DOT1Q), dry_run=False)
    report = Service(host.settings).run_pass()
    assert [str(p) for p in report.problems if "OVSDB" not in str(p)] == [], report.line()
    assert "cvlans=10-11" in host.alias("tap102i0"), host.alias("tap102i0")
    assert wire_from(qinq_q, frame(mac(14)), frame(mac(15), (Q, 12)),
                     frame(mac(16), (Q, 11))) == ["10:8100/960 8100/11"]

    # VM 100 migrates away (no post-stop on this node): the service removes what was its.
    host.taps.pop(100).close()
    qemu = host.qemus.pop(100)
    qemu.kill()
    qemu.wait()
    Service(host.settings).run_pass()
    assert not {name for name in host.links() if name.startswith(("vmbr0a", "vmbr0q"))}
    host.stop(102)
    assert {"vmbr0v950", "kvw0.950", "vmbr0v960", "kvw0.960"} <= host.links()  # Proxmox's stay Proxmox's
    assert guest_from(plain, frame(mac(17), (Q, 950))) == ["11:"]


def test_pre_start_refuses_a_qinq_that_cannot_hold_in_one_line(host, capsys):
    host.network(vlan_aware=True, bond=False, uplink_mtu=1500)
    host.vm(100, 950, QinQ(950))
    assert host.hook(100, "pre-start") == 8
    out = capsys.readouterr().out
    aborted = [line for line in out.splitlines() if "start aborted" in line]
    assert len(aborted) == 1 and "uplink kvw0 of vmbr0 has MTU 1500" in aborted[0] and "need 1504" in aborted[0], out
    host.ipr.link("set", index=host.pve.index("kvw0"), mtu=1504)
    host.ipr.link("set", index=host.pve.index("vmbr0"), mtu=1500)  # the port's MTU raised the bridge's
    host.ipr.link("add", ifname="vmbr0a950u", kind="dummy")  # a name the agent needs, someone else's
    assert host.hook(100, "pre-start") == 8
    said = capsys.readouterr().out
    assert "vmbr0a950u, the name of the agent's svlan device for S-VLAN 950 of vmbr0, is taken" in said
