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
