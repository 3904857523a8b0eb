"""QinQ proven with frames: the agent's dot1q-tunnel on a Proxmox-style tap port, and back.

Two network namespaces on veth pairs into a netdev bridge of a private ovs-vswitchd:
`tap901i0` stands in for Proxmox's tap of VM 901 net0 (plugged first, as pve-bridge does,
with tag=20), `h3trunk` is a trunk carrying every VLAN. The agent plans and applies
dot1q-tunnel on the tap (S-tag 950), and restores Proxmox's settings at "post-stop".
The last tests re-plug the tap with the stand-in's pve-bridge, as Proxmox does at every
start and re-plug, and look at what the guest reaches before the agent's post-start.

A frame that must be dropped is followed by a marker frame on the same path that must
arrive; the dropped one must not have arrived before the marker. No fixed sleeps.
"""

import dataclasses
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fixtures.frames import TPID, FrameProbe, frame, mac, tags_of
from pvestandin import Cluster
from pve_vhost_agent.model.actions import RestoreTapVlan
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ovs import plan_tap_qinq, plan_vm_removal
from pve_vhost_agent.model.ovs import PortVlan
from pve_vhost_agent.model.spec import EtherType, QinQ, TapQinQ, VmSpec

C_TAG = 0x8100  # the TPID of the customer tags a VM puts on its frames
TAP, TRUNK, BRIDGE = "tap901i0", "h3trunk", "h3qbr"
ETHTYPES = [EtherType.DOT1Q, EtherType.DOT1AD]
_macs = itertools.count(1)


@dataclasses.dataclass
class Lan:
    ovs: object
    db: Ovsdb
    vm: FrameProbe
    trunk: FrameProbe

    def tunnel(self, qinq: QinQ) -> None:
        """The agent's post-start step for VM 901 net0, then a check that it is idempotent."""
        spec = VmSpec(901, (), (TapQinQ(901, 0, qinq),))
        self.settle(plan_tap_qinq(spec, self.db.snapshot()))
        assert plan_tap_qinq(spec, self.db.snapshot()) == ()

    def settle(self, plan) -> None:
        self.db.apply(plan)
        # Datapath flows cached under the old settings are revalidated asynchronously.
        self.ovs.appctl("revalidator/wait")


@pytest.fixture(scope="module")
def lan(ovs):
    vm_ns, trunk_ns = f"{ovs.netns}-vm", f"{ovs.netns}-trunk"
    probes = []
    ovs.vsctl("add-br", BRIDGE, "--", "set", "Bridge", BRIDGE, "datapath_type=netdev")
    try:
        ovs.plug_namespace(TAP, vm_ns)
        ovs.plug_namespace(TRUNK, trunk_ns)
        ovs.vsctl("add-port", BRIDGE, TAP, "tag=20")  # as Proxmox's pve-bridge plugs net0 with tag=20
        ovs.vsctl("add-port", BRIDGE, TRUNK)
        probes = [FrameProbe(vm_ns, "eth0"), FrameProbe(trunk_ns, "eth0")]
        with Ovsdb(ovs.remote, timeout=10) as db:
            yield Lan(ovs, db, *probes)
    finally:
        for probe in probes:
            probe.close()
        ovs.unplug_namespace(vm_ns)
        ovs.unplug_namespace(trunk_ns)
        ovs.vsctl("--if-exists", "del-br", BRIDGE)


def new_mac() -> bytes:
    return mac(next(_macs))


def untagged(data: bytes) -> bytes:
    """The frame without its VLAN tags and padding: what must survive the trip."""
    return data[:12] + data[12 + 4 * len(tags_of(data)):].rstrip(b"\0")


def one_frame(probe: FrameProbe, src: bytes) -> bytes:
    got = [f for f in probe.collect(src) if f[6:12] == src]
    assert got, f"no frame from {src.hex()} reached {probe.name}"
    return got[0]


def passes(sender: FrameProbe, receiver: FrameProbe, *tags) -> list:
    """Send a frame with `tags`; return the tags it arrived with (its payload must be intact)."""
    src = new_mac()
    sent = frame(src, *tags)
    sender.send(sent)
    got = one_frame(receiver, src)
    assert untagged(got) == untagged(sent)
    return tags_of(got)


def dropped(sender: FrameProbe, receiver: FrameProbe, tags, marker_tags) -> bool:
    """Send a frame with `tags`, then a marker that must pass; True if the first never came."""
    src, marker = new_mac(), new_mac()
    sender.send(frame(src, *tags))
    sender.send(frame(marker, *marker_tags))
    seen = [f[6:12] for f in receiver.collect(marker)]
    assert marker in seen, f"the marker frame did not reach {receiver.name}"
    return src not in seen


@pytest.mark.parametrize("ethtype", ETHTYPES, ids=lambda e: e.value)
def test_vm_frames_leave_the_trunk_with_the_s_tag(lan, ethtype):
    lan.tunnel(QinQ(950, (), ethtype))
    s_tag = TPID[ethtype.value]
    assert passes(lan.vm, lan.trunk) == [(s_tag, 950)]
    assert passes(lan.vm, lan.trunk, (C_TAG, 10)) == [(s_tag, 950), (C_TAG, 10)]


@pytest.mark.parametrize("ethtype", ETHTYPES, ids=lambda e: e.value)
def test_trunk_frames_lose_the_outer_tag(lan, ethtype):
    lan.tunnel(QinQ(950, (), ethtype))
    s_tag = TPID[ethtype.value]
    assert passes(lan.trunk, lan.vm, (s_tag, 950), (C_TAG, 10)) == [(C_TAG, 10)]
    assert passes(lan.trunk, lan.vm, (s_tag, 950)) == []
    assert dropped(lan.trunk, lan.vm, [(s_tag, 951), (C_TAG, 10)], [(s_tag, 950), (C_TAG, 10)])


def test_customer_vlans_outside_cvlans_are_dropped(lan):
    lan.tunnel(QinQ(950, (10, 11), EtherType.DOT1Q))
    s_tag = TPID["802.1q"]
    assert dropped(lan.vm, lan.trunk, [(C_TAG, 12)], [(C_TAG, 11)])
    assert dropped(lan.vm, lan.trunk, [], [(C_TAG, 10)])  # untagged is not in cvlans either
    assert dropped(lan.trunk, lan.vm, [(s_tag, 950), (C_TAG, 12)], [(s_tag, 950), (C_TAG, 10)])
    assert passes(lan.vm, lan.trunk, (C_TAG, 11)) == [(s_tag, 950), (C_TAG, 11)]


def test_restore_gives_back_proxmoxs_access_port_which_drops_tagged_frames(lan):
    lan.tunnel(QinQ(950, (10,), EtherType.DOT1AD))
    plan = plan_vm_removal(901, lan.db.snapshot())
    assert plan == (RestoreTapVlan(TAP, PortVlan("", 20), 901),)
    lan.settle(plan)
    assert lan.ovs.get("Port", TAP, "tag", "vlan_mode", "cvlans", "other_config", "external_ids") == {
        "tag": 20, "vlan_mode": [], "cvlans": [], "other_config": {}, "external_ids": {}}
    assert plan_vm_removal(901, lan.db.snapshot()) == ()
    # An access port again: untagged frames join VLAN 20, tagged ones are dropped (no VLAN hopping).
    assert passes(lan.vm, lan.trunk) == [(C_TAG, 20)]
    assert passes(lan.trunk, lan.vm, (C_TAG, 20)) == []
    assert dropped(lan.vm, lan.trunk, [(C_TAG, 950)], [])
    assert dropped(lan.vm, lan.trunk, [(C_TAG, 20), (C_TAG, 950)], [])
    assert dropped(lan.vm, lan.trunk, [(TPID["802.1ad"], 950), (C_TAG, 10)], [])


def test_restore_brings_back_native_untagged_trunks(lan):
    lan.ovs.vsctl("set", "Port", TAP, "tag=20", "trunks=20,30", "vlan_mode=native-untagged", "external_ids={}")
    lan.tunnel(QinQ(950))
    lan.settle(plan_vm_removal(901, lan.db.snapshot()))
    assert lan.ovs.get("Port", TAP, "tag", "trunks", "vlan_mode", "external_ids") == {
        "tag": 20, "trunks": [20, 30], "vlan_mode": "native-untagged", "external_ids": {}}
    lan.ovs.vsctl("set", "Port", TAP, "trunks=[]", "vlan_mode=[]")


def test_the_agent_reads_the_taps_link_state_and_ofport(lan):
    iface = lan.db.snapshot().port(TAP).interface
    assert (iface.link_state, iface.admin_state, iface.error) == ("up", "up", "")
    assert iface.ofport and iface.ofport > 0


# --- fail closed: what the guest reaches before (or without) the agent's post-start ---------


def plug_with_pve_bridge(ovs, net0: str) -> None:
    """Proxmox's plug of VM 901's net0, by the stand-in's pve-bridge in vswitchd's namespace."""
    base = Path(tempfile.mkdtemp(prefix="h12qs-pve-", dir="/tmp"))
    try:
        cluster = Cluster(base / "cluster", base)
        node = cluster.add_node("nodeA", netns=ovs.netns, ovsdb=ovs.remote)
        cluster.write_vm_config("nodeA", 901, f"memory: 128\nnet0: {net0}\n")
        script = node.path("/usr/libexec/qemu-server/pve-bridge")
        env = {k: v for k, v in os.environ.items() if k != "PVE_MIGRATED_FROM"}
        result = subprocess.run(["ip", "netns", "exec", ovs.netns, str(script), TAP], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_without_post_start_a_tap_tagged_with_the_s_tag_fails_closed(lan):
    """`qinq set` makes the NIC carry tag=<S-tag>: when post-start fails (or right after
    Proxmox re-plugs the tap), the guest is on the S-VLAN only, never a trunk of every VLAN."""
    try:
        plug_with_pve_bridge(lan.ovs, f"virtio=02:68:33:00:09:01,bridge={BRIDGE},tag=950")
        lan.ovs.appctl("revalidator/wait")
        assert lan.ovs.get("Port", TAP, "tag", "vlan_mode", "trunks", "external_ids") == {
            "tag": 950, "vlan_mode": [], "trunks": [], "external_ids": {}}
        # No post-start yet: untagged guest frames join S-VLAN 950 (a single 802.1Q tag) ...
        assert passes(lan.vm, lan.trunk) == [(C_TAG, 950)]
        # ... and the guest's own VLANs go nowhere: no VLAN hopping on the provider bridge.
        assert dropped(lan.vm, lan.trunk, [(C_TAG, 10)], [])
        assert dropped(lan.vm, lan.trunk, [(C_TAG, 951)], [])
        assert dropped(lan.vm, lan.trunk, [(TPID["802.1ad"], 951), (C_TAG, 10)], [])
        assert dropped(lan.trunk, lan.vm, [(C_TAG, 10)], [(C_TAG, 950)])
        # The agent's post-start: the same guest frames now leave the trunk double-tagged.
        lan.tunnel(QinQ(950))
        s_tag = TPID["802.1ad"]
        assert passes(lan.vm, lan.trunk, (C_TAG, 10)) == [(s_tag, 950), (C_TAG, 10)]
        assert passes(lan.vm, lan.trunk) == [(s_tag, 950)]
    finally:
        lan.ovs.vsctl("--", "--if-exists", "del-port", TAP, "--", "add-port", BRIDGE, TAP, "tag=20")
        lan.ovs.appctl("revalidator/wait")


def test_without_post_start_an_untagged_tap_would_be_a_trunk_of_every_vlan(lan):
    """Why `qinq set` refuses an untagged NIC: pve-bridge would plug it as a trunk."""
    try:
        plug_with_pve_bridge(lan.ovs, f"virtio=02:68:33:00:09:01,bridge={BRIDGE}")
        lan.ovs.appctl("revalidator/wait")
        assert passes(lan.vm, lan.trunk, (C_TAG, 10)) == [(C_TAG, 10)]
        assert passes(lan.vm, lan.trunk, (C_TAG, 4000)) == [(C_TAG, 4000)]
    finally:
        lan.ovs.vsctl("--", "--if-exists", "del-port", TAP, "--", "add-port", BRIDGE, TAP, "tag=20")
        lan.ovs.appctl("revalidator/wait")
