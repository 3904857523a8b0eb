"""Shared builders for the table tests: specs, VM configs and observed Open vSwitch states.

Defaults describe a healthy host: vhost-user NICs of VM 100 on the netdev bridge
`vhostbr0`, Proxmox's taps on `vmbr0`, vlan-limit 2 with a datapath probed for two
VLAN headers, and an OVS-DPDK ovs-vswitchd.
"""

from pathlib import Path

from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.model.ovs import FrozenMap, OvsBridge, OvsInterface, OvsPort, OvsState, PortVlan
from pve_vhost_agent.model.spec import Backend, EtherType, QinQ, VhostNic, VlanPolicy

RUN = Path("/run/pve-vhost-agent")
SOCKETS = RUN / "ovs"
SOCKET_DIRS = {b: RUN / b.value for b in Backend}
MAC = "02:00:00:00:01:00"
DPDK_TYPES = ("dpdk", "dpdkvhostuser", "dpdkvhostuserclient", "internal", "system", "tap")
QINQ_950 = VlanPolicy(qinq=QinQ(950, (10, 11), EtherType.DOT1Q))
TUNNEL_950 = PortVlan("dot1q-tunnel", 950, (), (10, 11), "802.1q")
PVE_TAG_20 = PortVlan("", 20)  # what Proxmox's pve-bridge gives a NIC with tag=20
ROUTER = "balloon: 0\nboot: order=scsi0\nmemory: 4096\nname: router\n"  # a VM vhost-user NICs can serve


def nic(index=0, bridge="vhostbr0", vlan=VlanPolicy(), vmid=100, **kw) -> VhostNic:
    return VhostNic(vmid, index, bridge, MAC[:-1] + str(index), vlan=vlan, **kw)


def vm_config(body: str = ROUTER, **keys: str) -> VmConfig:
    """A VM config from its text, with `keys` (e.g. net0="virtio=...,bridge=vmbr0") added."""
    return VmConfig.parse(body + "".join(f"{key}: {value}\n" for key, value in keys.items()))


def ids(owner, vmid=100, nic="net0", **extra) -> FrozenMap:
    return FrozenMap({"pve-vhost-agent:owner": owner, "pve-vhost-agent:vmid": str(vmid),
                      "pve-vhost-agent:nic": nic, **extra})


def vhost_port(name="vhu100i0", bridge="vhostbr0", vlan=PortVlan(), socket=str(SOCKETS / "vm-100-0.sock"),
               external_ids=ids("port"), mtu=None, iface_type="dpdkvhostuserclient", status=(), ofport=None,
               error="") -> OvsPort:
    iface = OvsInterface(name, iface_type, FrozenMap({"vhost-server-path": socket}), FrozenMap(dict(status)),
                         mtu_request=mtu, ofport=ofport, error=error)
    return OvsPort(name, bridge, vlan, external_ids, (iface,))


def tap_port(name="tap100i1", bridge="vmbr0", vlan=PVE_TAG_20, external_ids=FrozenMap()) -> OvsPort:
    return OvsPort(name, bridge, vlan, external_ids, (OvsInterface(name),))


def ovs_state(*ports, bridges=(OvsBridge("vhostbr0", "netdev"), OvsBridge("vmbr0", "netdev")),
              vlan_limit="2", probed=(("netdev", "2"),), iface_types=DPDK_TYPES, datapaths=None) -> OvsState:
    return OvsState(
        bridges=tuple(bridges), ports=tuple(ports),
        other_config=FrozenMap({"vlan-limit": vlan_limit} if vlan_limit else {}),
        iface_types=iface_types, probed_vlan_headers=FrozenMap(dict(probed)),
        datapath_owners=FrozenMap({dp: "datapath" for dp, _ in dict(probed).items()} if datapaths is None else datapaths),
    )


# --- the host network doctor (plan/doctor*.py) ------------------------------------------

# A seed-style Proxmox host: an 802.3ad bond of two ports with jumbo frames under a
# VLAN-aware vmbr0, a VLAN device on it, and a NAT bridge for private VMs. The pure tests
# and tests/test_doctor_real_kernel.py (which builds it on a real kernel) share it.
SEED_MAIN = """\
auto lo
iface lo inet loopback

iface eno1 inet manual
iface eno2 inet manual

auto bond0
iface bond0 inet manual
\tbond-slaves eno1 eno2
\tbond-miimon 100
\tbond-mode 802.3ad
\tbond-xmit-hash-policy layer3+4
\tbond-lacp-rate 1
\tmtu 9000

auto vmbr0
iface vmbr0 inet static
\taddress 10.0.0.2/24
\tbridge-ports bond0
\tbridge-stp off
\tbridge-fd 0
\tbridge-vlan-aware yes
\tbridge-vids 2-4094
\tmtu 9000

auto vmbr0.50
iface vmbr0.50 inet static
\taddress 10.50.0.2/24
\tmtu 9000

source /etc/network/interfaces.d/*
"""
# The NAT bridge, in a file of /etc/network/interfaces.d/ (the real-kernel test sources it).
SEED_NAT = """\
auto vmbr1
iface vmbr1 inet static
\taddress 10.10.10.1/24
\tbridge-ports none
\tbridge-stp off
\tbridge-fd 0
\tpost-up echo 1 > /proc/sys/net/ipv4/ip_forward
\tpost-up iptables -t nat -A POSTROUTING -s '10.10.10.0/24' -o vmbr0 -j MASQUERADE
"""
SEED_INTERFACES = SEED_MAIN + "\n" + SEED_NAT


def seed_network_file(text: str = SEED_INTERFACES):
    from pve_vhost_agent.formats.interfaces import combine, parse_file
    return combine([parse_file(text, "/etc/network/interfaces")])


def host_link(name, kind="", mtu=9000, **kw):
    from pve_vhost_agent.model.hostnet import HostLink
    return HostLink(name, kw.pop("index", abs(hash(name)) % 10000), kind, mtu, kw.pop("up", True), **kw)


def seed_links(partner="52:54:00:00:00:99") -> dict:
    """The seed host's links as netlink shows them, healthy, by name."""
    from pve_vhost_agent.model.hostnet import BondSlaveState, BondState, BridgeState, VlanState
    vids = tuple(range(2, 4095))
    links = [
        host_link("eno1", master="bond0", bond_slave=BondSlaveState(True, True, 1)),
        host_link("eno2", master="bond0", bond_slave=BondSlaveState(True, True, 1)),
        host_link("bond0", "bond", master="vmbr0", vids=(1, *vids),
                  bond=BondState("802.3ad", 100, 0, "layer3+4", 1, partner)),
        host_link("vmbr0", "bridge", bridge=BridgeState(vlan_filtering=True)),
        host_link("vmbr0.50", "vlan", lower="vmbr0", vlan=VlanState(50, "802.1q")),
        host_link("vmbr1", "bridge", mtu=1500, bridge=BridgeState()),
        host_link("lo", "", mtu=65536),
    ]
    return {link.name: link for link in links}


def host_net(links: dict, ip_forward="1"):
    from pve_vhost_agent.model.hostnet import HostNet
    return HostNet(tuple(links.values()), FrozenMap({"net.ipv4.ip_forward": ip_forward} if ip_forward else {}))


def host_facts(cpus=32, mem_gib=256, packages=("openvswitch-switch-dpdk", "librte-mempool-ring23"),
               alternative="/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk", available_gib=200, hugepages=()):
    from pve_vhost_agent.model.host import HostMemory
    from pve_vhost_agent.model.hostnet import HostFacts
    return HostFacts(cpus, mem_gib << 20, HostMemory(available_gib << 20, dict(hugepages)), frozenset(packages),
                     alternative)
