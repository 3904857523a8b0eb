"""Shared builders for the table tests: specs, VM configs, observed Open vSwitch states and links.

Defaults describe a healthy host: vhost-user NICs of VM 100 on the netdev bridge
`vhostbr0`, Proxmox's taps on `vmbr0`, vlan-limit 2 with a datapath probed for two
VLAN headers, and an OVS-DPDK ovs-vswitchd; for Linux bridges, `linux_host`.
"""

import dataclasses
from pathlib import Path

from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.model.lbactions import AddSVlanBridge, SetLinuxTapQinQ
from pve_vhost_agent.model.netdevs import (
    ETH_P_8021AD, ETH_P_8021Q, ROLE_PEER, ROLE_SBRIDGE, ROLE_SVLAN, ROLE_TAP, ROLE_TRUNK, BridgeVlan, LinkInfo, LinkMark,
    LinkState, SVlanBridge, TcFilter, filter_rules,
)
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


# --- Linux bridges (QinQ on Proxmox's taps of Linux bridges) -------------------------------

PVE_ACCESS_950 = (BridgeVlan(950, True, True),)  # what pve-bridge gives a tag=950 tap on a VLAN-aware bridge


def linux_host(*extra: LinkInfo, vlan_aware: bool = True, protocol: int = ETH_P_8021Q, uplinks=("eth0",),
               uplink_mtu: int = 1504, bridge_mtu: int = 1500, taps=("tap100i0",), tap_vlans=PVE_ACCESS_950) -> LinkState:
    """Proxmox's Linux bridge vmbr0 (index 10) with its uplinks (index 2 on) and VM taps
    (index 20 on) plugged by pve-bridge for tag=950: into vmbr0 with VLAN 950 untagged
    (VLAN-aware), or into vmbr0v950 over <uplink>.950 (traditional, index 11 and 12)."""
    links = [LinkInfo("vmbr0", 10, "bridge", bridge_mtu, vlan_filtering=vlan_aware, bridge_vlan_protocol=protocol)]
    links += [LinkInfo(name, 2 + n, "bond" if name.startswith("bond") else "", uplink_mtu, master=10)
              for n, name in enumerate(uplinks)]
    master = 10
    if not vlan_aware and uplinks:
        links += [LinkInfo("vmbr0v950", 11, "bridge", bridge_mtu),
                  LinkInfo(f"{uplinks[0]}.950", 12, "vlan", uplink_mtu, master=11, lower=2, vlan_id=950,
                           vlan_protocol=ETH_P_8021Q)]
        master = 11
    links += [LinkInfo(name, 20 + n, "tun", bridge_mtu, master=master, vlans=tap_vlans if vlan_aware else ())
              for n, name in enumerate(taps)]
    return LinkState(tuple(links) + extra)


def with_links(state: LinkState, *changed: LinkInfo) -> LinkState:
    """`state` with these links replacing those of the same name (or added)."""
    replaced = {link.name for link in changed}
    return LinkState(tuple(link for link in state.links if link.name not in replaced) + changed)


def devices(svlan: SVlanBridge, host: LinkState, first_index: int = 40) -> tuple[LinkInfo, ...]:
    """The agent's devices for `svlan` as post-start leaves them."""
    sbridge = LinkInfo(svlan.name(), first_index, "bridge", alias=svlan.mark(ROLE_SBRIDGE).alias())
    made = [sbridge]
    if svlan.through_bridge:
        made += [LinkInfo(svlan.name(ROLE_PEER), first_index + 1, "veth", svlan.mtu, lower=first_index + 2,
                          alias=svlan.mark(ROLE_PEER).alias()),
                 LinkInfo(svlan.name(ROLE_TRUNK), first_index + 2, "veth", svlan.mtu, master=10, lower=first_index + 1,
                          alias=svlan.mark(ROLE_TRUNK).alias(), vlans=(BridgeVlan(svlan.stag),))]
        lower = first_index + 1
    else:
        lower = host.get(svlan.lower).index
    tpid = ETH_P_8021AD if svlan.ethertype is EtherType.DOT1AD else ETH_P_8021Q
    made.append(LinkInfo(svlan.name(ROLE_SVLAN), first_index + 3, "vlan", master=first_index, lower=lower,
                         vlan_id=svlan.stag, vlan_protocol=tpid, alias=svlan.mark(ROLE_SVLAN).alias()))
    return tuple(made)


def qinq_tap(host: LinkState, action: SetLinuxTapQinQ, name="tap100i0") -> LinkInfo:
    """The tap as the action leaves it."""
    q = action.qinq
    mark = LinkMark(ROLE_TAP, action.bridge, q.stag, q.ethertype, action.vmid, action.nic, q.cvlans, action.master,
                    action.saved)
    filters = tuple(TcFilter(r.direction, r.pref, r.kind) for r in filter_rules(q.cvlans))
    return dataclasses.replace(host.get(name), master=host.get(action.master).index, vlans=(), alias=mark.alias(),
                               filters=filters)


def after(host: LinkState, actions) -> LinkState:
    """The host once these actions took effect (what the adapter does, in values)."""
    for action in actions:
        if isinstance(action, AddSVlanBridge):
            host = with_links(host, *devices(action.svlan, host))
    for action in actions:
        if isinstance(action, SetLinuxTapQinQ):
            host = with_links(host, qinq_tap(host, action, action.port))
    return host


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
