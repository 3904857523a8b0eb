"""The OVS planner as tables: a VM spec and an observed OVS state in, actions out (no OVS)."""

import pytest

from builders import (
    PVE_TAG_20, QINQ_950, SOCKETS, TUNNEL_950, ids, nic, ovs_state, tap_port, vhost_port,
)

from pve_vhost_agent.errors import NotFound, OvsRefused, OwnershipError
from pve_vhost_agent.model.actions import (
    AddVhostPort, DelPort, EnsureBridge, ReplaceVhostPort, RestoreTapVlan, SetPortMtu,
    SetPortVlan, SetTapQinQ, SetVlanLimit, CheckVlanHeaders, DropDatapath, EnsureDatapath,
)
from pve_vhost_agent.plan.ovs import (
    plan_gc, plan_live_vhost_ports, plan_tap_qinq, plan_vhost_ports, plan_vm, plan_vm_removal,
)
from pve_vhost_agent.model.ovs import (
    FrozenMap, OvsBridge, OvsPort, PortVlan,
)
from pve_vhost_agent.model.spec import (
    Backend, EtherType, QinQ, TapQinQ, VlanPolicy, VmSpec,
)

state = ovs_state


def add(n, vlan=PortVlan(), mtu=None, socket=None):
    return AddVhostPort(n.port_name, n.bridge, n.vmid, n.name, socket or str(SOCKETS / n.socket_name), vlan, mtu)


def test_port_vlan_maps_each_policy_to_ovs_columns():
    assert PortVlan.of_policy(VlanPolicy()) == PortVlan()
    assert PortVlan.of_policy(VlanPolicy(tag=10)) == PortVlan("access", 10)
    assert PortVlan.of_policy(VlanPolicy(trunks=(10, 20))) == PortVlan("trunk", None, (10, 20))
    assert PortVlan.of_policy(QINQ_950) == TUNNEL_950
    assert PortVlan.of_policy(VlanPolicy(qinq=QinQ(7))) == PortVlan("dot1q-tunnel", 7, (), (), "802.1ad")


FRESH = state(bridges=(), vlan_limit="")

VHOST_TABLE = [
    # (what, spec NICs, observed, expected actions)
    ("new bridge and port", (nic(vlan=VlanPolicy(tag=10)),), FRESH,
     (EnsureBridge("vhostbr0", "netdev"), add(nic(), PortVlan("access", 10)))),
    ("QinQ on a host with no datapath yet sets vlan-limit first", (nic(vlan=QINQ_950),), FRESH,
     (SetVlanLimit(2, ""), EnsureBridge("vhostbr0", "netdev"), add(nic(), TUNNEL_950))),
    ("vlan-limit already 2", (nic(vlan=QINQ_950),), state(),
     (add(nic(), TUNNEL_950),)),
    ("vlan-limit 2 but no Datapath row says what the running datapath probed: make one, check it",
     (nic(vlan=QINQ_950),), state(probed=(), datapaths={}),
     (EnsureDatapath("netdev"), CheckVlanHeaders("netdev", 2), add(nic(), TUNNEL_950))),
    ("the agent's Datapath row was left empty by ovs-vswitchd: made anew", (nic(vlan=QINQ_950),),
     state(probed=(), datapaths={"netdev": "datapath"}),
     (DropDatapath("netdev"), EnsureDatapath("netdev"), CheckVlanHeaders("netdev", 2), add(nic(), TUNNEL_950))),
    ("an operator's Datapath row without the probe is never touched", (nic(vlan=QINQ_950),),
     state(probed=(), datapaths={"netdev": ""}), (add(nic(), TUNNEL_950),)),
    ("vlan-limit 0 means no limit", (nic(vlan=QINQ_950),), state(vlan_limit="0"),
     (add(nic(), TUNNEL_950),)),
    ("datapath already probed with 2 headers: raising the limit is safe", (nic(vlan=QINQ_950),),
     state(vlan_limit="1", probed={"netdev": "2"}), (SetVlanLimit(2, "1"), add(nic(), TUNNEL_950))),
    ("two NICs, MTU, trunks", (nic(0, mtu=9000), nic(1, vlan=VlanPolicy(trunks=(5, 6)))), state(),
     (add(nic(0), mtu=9000), add(nic(1), PortVlan("trunk", None, (5, 6))))),
    ("external backend: nothing for OVS", (nic(backend=Backend.EXTERNAL),), FRESH, ()),
    ("in place already", (nic(vlan=QINQ_950),), state(vhost_port(vlan=TUNNEL_950)), ()),
    ("VLAN changed", (nic(vlan=VlanPolicy(tag=30)),), state(vhost_port(vlan=TUNNEL_950)),
     (SetPortVlan("vhu100i0", PortVlan("access", 30), 100),)),
    ("MTU changed and dropped", (nic(),), state(vhost_port(mtu=9000)), (SetPortMtu("vhu100i0", None, 100),)),
    ("socket path changed: delete and re-add", (nic(),), state(vhost_port(socket="/old/vm-100-0.sock")),
     (ReplaceVhostPort(f"socket /old/vm-100-0.sock -> {SOCKETS}/vm-100-0.sock", add(nic())),)),
    ("bridge changed: delete and re-add", (nic(bridge="vhostbr1"),), state(vhost_port()),
     (EnsureBridge("vhostbr1", "netdev"), ReplaceVhostPort("bridge vhostbr0 -> vhostbr1", add(nic(bridge="vhostbr1"))))),
    ("NIC left the spec: its port goes, foreign and other VMs' ports stay", (),
     state(vhost_port(), vhost_port("vhu101i0", external_ids=ids("port", 101)), vhost_port("vhu100i5", external_ids=FrozenMap())),
     (DelPort("vhu100i0", "vhostbr0", 100),)),
]


@pytest.mark.parametrize("what,nics,observed,expected", VHOST_TABLE, ids=[row[0] for row in VHOST_TABLE])
def test_vhost_port_plans(what, nics, observed, expected):
    assert plan_vhost_ports(VmSpec(100, nics), observed, SOCKETS) == expected


REFUSALS = [
    ("foreign port with the NIC's name", (nic(),), state(vhost_port(external_ids=FrozenMap({"iface-id": "x"}))),
     OwnershipError, "not the agent's (no pve-vhost-agent external_ids)"),
    ("agent's port of another VM under that name", (nic(),), state(vhost_port(external_ids=ids("port", 999))),
     OwnershipError, "owner=port vmid=999"),
    ("a tap the agent only re-tagged", (nic(),), state(vhost_port(external_ids=ids("vlan"))),
     OwnershipError, "not the agent's"),
    ("vhost-user bridge on the kernel datapath", (nic(),), state(bridges=(OvsBridge("vhostbr0", ""),)),
     OvsRefused, "bridge vhostbr0 uses the system datapath"),
    ("vswitchd without DPDK", (nic(),), state(iface_types=("internal", "system", "tap")),
     OvsRefused, "dpdkvhostuserclient is not among its interface types"),
    ("QinQ, vlan-limit 1 and a datapath already running", (nic(vlan=QINQ_950),), state(vlan_limit="", probed=()),
     OvsRefused, "vlan-limit 2 or 0, but it is 1"),
    ("QinQ, vlan-limit 1, only one of the datapaths known to be probed with 2", (nic(vlan=QINQ_950),),
     state(OvsPort("x"), vlan_limit="1", probed={"netdev": "2"},
           bridges=(OvsBridge("vhostbr0", "netdev"), OvsBridge("vmbr0", "system"))),
     OvsRefused, "restart ovs-vswitchd"),
    ("QinQ, vlan-limit 2 set after the datapath probed 1 header", (nic(vlan=QINQ_950),), state(probed={"netdev": "1"}),
     OvsRefused, "the netdev datapath was probed with 1"),
]


@pytest.mark.parametrize("what,nics,observed,error,text", REFUSALS, ids=[row[0] for row in REFUSALS])
def test_vhost_port_refusals_say_why_in_one_line(what, nics, observed, error, text):
    with pytest.raises(error) as caught:
        plan_vhost_ports(VmSpec(100, nics), observed, SOCKETS)
    message = str(caught.value)
    assert text in message
    assert "\n" not in message and caught.value.fix


def test_missing_bridge_is_an_error_when_the_agent_may_not_create_it():
    with pytest.raises(NotFound, match="bridge vhostbr0 does not exist.*datapath_type=netdev"):
        plan_vhost_ports(VmSpec(100, (nic(),)), FRESH, SOCKETS, create_bridges=False)


def test_no_qinq_needs_no_vlan_limit_even_when_it_is_1():
    assert plan_vhost_ports(VmSpec(100, (nic(),)), state(vlan_limit=""), SOCKETS) == (add(nic()),)


TAP = TapQinQ(100, 1, QinQ(950, (10, 11), EtherType.DOT1Q))
TAPPED = ids("vlan", nic="net1", **{"pve-vhost-agent:saved-vlan": PVE_TAG_20.to_json()})

TAP_TABLE = [
    ("Proxmox's tap gets dot1q-tunnel, its tag is saved", (TAP,), state(tap_port()),
     (SetTapQinQ("tap100i1", 100, "net1", TUNNEL_950, PVE_TAG_20),)),
    ("already done", (TAP,), state(tap_port(vlan=TUNNEL_950, external_ids=TAPPED)), ()),
    ("S-tag changed: the first saved settings stay", (TapQinQ(100, 1, QinQ(951)),),
     state(tap_port(vlan=TUNNEL_950, external_ids=TAPPED)),
     (SetTapQinQ("tap100i1", 100, "net1", PortVlan("dot1q-tunnel", 951, (), (), "802.1ad"), PVE_TAG_20),)),
    ("re-plugged by Proxmox (marks gone): save its settings again", (TAP,),
     state(tap_port(vlan=PortVlan("native-untagged", 20, (20, 30)))),
     (SetTapQinQ("tap100i1", 100, "net1", TUNNEL_950, PortVlan("native-untagged", 20, (20, 30))),)),
    ("QinQ left the spec: restore Proxmox's settings", (),
     state(tap_port(vlan=TUNNEL_950, external_ids=TAPPED)), (RestoreTapVlan("tap100i1", PVE_TAG_20, 100),)),
    ("QinQ on a tap with vlan-limit 0", (TAP,), state(tap_port(), vlan_limit="0"),
     (SetTapQinQ("tap100i1", 100, "net1", TUNNEL_950, PVE_TAG_20),)),
]


@pytest.mark.parametrize("what,taps,observed,expected", TAP_TABLE, ids=[row[0] for row in TAP_TABLE])
def test_tap_qinq_plans(what, taps, observed, expected):
    assert plan_tap_qinq(VmSpec(100, (), taps), observed) == expected


def test_tap_qinq_needs_the_tap_port():
    with pytest.raises(NotFound, match="VM 100 net1: Open vSwitch has no port tap100i1.*firewall=0"):
        plan_tap_qinq(VmSpec(100, (), (TAP,)), state())


def test_tap_qinq_refuses_vlan_limit_1_on_proxmoxs_running_bridge():
    with pytest.raises(OvsRefused, match="vlan-limit=2`, then restart ovs-vswitchd"):
        plan_tap_qinq(VmSpec(100, (), (TAP,)), state(tap_port(), vlan_limit="", probed=()))


def test_tap_with_an_agent_port_under_its_name_is_not_taken_over():
    with pytest.raises(OwnershipError):
        plan_tap_qinq(VmSpec(100, (), (TAP,)), state(tap_port(external_ids=ids("port", nic="net1"))))


def test_plan_vm_is_ports_then_taps():
    spec = VmSpec(100, (nic(),), (TAP,))
    observed = state(tap_port())
    assert plan_vm(spec, observed, SOCKETS) == (add(nic()), SetTapQinQ("tap100i1", 100, "net1", TUNNEL_950, PVE_TAG_20))


MIXED = state(
    vhost_port(), vhost_port("vhu100i2", external_ids=ids("port", nic="net2")),
    tap_port(vlan=TUNNEL_950, external_ids=TAPPED),
    tap_port("tap100i3", vlan=TUNNEL_950, external_ids=ids("vlan", nic="net3", **{"pve-vhost-agent:saved-vlan": "{bad"})),
    vhost_port("vhu101i0", external_ids=ids("port", 101)),
    vhost_port("vhu102i0", external_ids=FrozenMap()),  # foreign, under an agent-like name
    tap_port("tap102i0"),  # Proxmox's, untouched by the agent
)


def test_removal_deletes_the_vms_ports_and_restores_its_taps_only():
    assert plan_vm_removal(100, MIXED) == (
        DelPort("vhu100i0", "vhostbr0", 100),
        DelPort("vhu100i2", "vhostbr0", 100),
        RestoreTapVlan("tap100i1", PVE_TAG_20, 100),
        RestoreTapVlan("tap100i3", PortVlan(), 100),  # a mangled saved value restores Proxmox's default
    )
    assert plan_vm_removal(102, MIXED) == ()


def test_gc_undoes_only_what_belongs_to_vms_that_are_gone():
    assert plan_gc([100], MIXED) == (DelPort("vhu101i0", "vhostbr0", 101),)
    assert {a.port for a in plan_gc([], MIXED)} == {"tap100i1", "tap100i3", "vhu100i0", "vhu100i2", "vhu101i0"}


def test_actions_print_their_fields():
    text = repr(SetTapQinQ("tap100i1", 100, "net1", TUNNEL_950, PVE_TAG_20))
    assert "port='tap100i1'" in text and "tag=950" in text and "saved=PortVlan(mode='', tag=20" in text
    assert str(TUNNEL_950) == "dot1q-tunnel tag=950 cvlans=10,11 qinq-ethtype=802.1q"


def test_saved_vlan_survives_its_external_ids_form():
    for vlan in (PortVlan(), PVE_TAG_20, TUNNEL_950, PortVlan("native-untagged", 20, (20, 30, 31))):
        assert PortVlan.from_json(vlan.to_json()) == vlan
    assert PortVlan.from_json("{bad") is None
    assert PortVlan.from_json('{"mode": 1}') is None


SERVED = {"vm-100-0.sock"}  # QEMU of the running VM serves net0's socket only
LIVE_TABLE = [
    ("VLAN and MTU change in place", (nic(vlan=VlanPolicy(tag=20), mtu=9000),), state(vhost_port(vlan=PortVlan("access", 10))),
     (SetPortVlan("vhu100i0", PortVlan("access", 20), 100), SetPortMtu("vhu100i0", 9000, 100)), ()),
    ("a port deleted by hand comes back while QEMU serves its socket", (nic(),), state(), (add(nic()),), ()),
    ("a NIC the running QEMU does not have waits", (nic(), nic(1)), state(vhost_port()), (),
     ("VM 100: port vhu100i1 (the running QEMU has no net1 yet) takes effect at the next start",)),
    ("a new bridge is made only at pre-start", (nic(bridge="newbr"),), state(), (),
     ("VM 100: creating bridge newbr takes effect at the next start",
      "VM 100: port vhu100i0 on the new bridge newbr takes effect at the next start")),
    ("a connected port is never replaced", (nic(bridge="vmbr0", vlan=VlanPolicy(tag=20)),),
     state(vhost_port()), (),
     ("VM 100: re-creating port vhu100i0 (bridge vhostbr0 -> vmbr0) takes effect at the next start",)),
    ("nor deleted", (), state(vhost_port()), (),
     ("VM 100: removing port vhu100i0 (QEMU still has its NIC) takes effect at the next start",)),
    ("datapath checks only come with a port change", (nic(vlan=QINQ_950),),
     state(vhost_port(vlan=TUNNEL_950), probed=(), datapaths={}), (), ()),
]


@pytest.mark.parametrize("what, nics, observed, now, later", LIVE_TABLE, ids=[r[0] for r in LIVE_TABLE])
def test_live_vhost_port_plans(what, nics, observed, now, later):
    assert plan_live_vhost_ports(VmSpec(100, nics), observed, SOCKETS, SERVED) == (now, later)
