"""The doctor's Open vSwitch checks: is OVS (and OVS-DPDK) ready for the vhost-user NICs
and QinQ ports this node's VMs declare, and do those NICs' bridges carry their frames?
Pure: the declarations, the OVS snapshot, the kernel's links and host facts in.

Nothing is checked for a node whose VMs declare nothing: OVS missing there is only info.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from pve_vhost_agent.formats.vmlayout import memory_layout, parse_net, parse_property_string
from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.model.findings import Finding, Severity
from pve_vhost_agent.model.hostnet import HostFacts, HostNet
from pve_vhost_agent.model.ovs import RESTART_FIX, VHOST_CLIENT, OvsState
from pve_vhost_agent.model.spec import VhostNic, VmSpec
from pve_vhost_agent.plan.capacity import capacity_warnings, shared_memory_need
from pve_vhost_agent.plan.observed import LocalVm
from pve_vhost_agent.plan.ovs import QINQ_VLAN_LIMIT, VHOST_DATAPATH
from pve_vhost_agent.plan.tapqinq import QINQ_HEADER, is_uplink

OVS = "Open vSwitch"
DPDK_VSWITCHD = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
SWITCH_TO_DPDK = ("apt install openvswitch-switch-dpdk; update-alternatives --set ovs-vswitchd "
                  f"{DPDK_VSWITCHD}; systemctl restart openvswitch-switch")
MEMPOOL_RING = "librte-mempool-ring"  # DPDK's ring mempool driver: ...-ring23 on Debian 12, ...-ring25 on 13
DEFAULT_MTU = 1500
SMALL_HOST_CPUS = 8
SMALL_HOST_KIB = 32 * 1024 * 1024
_KERNEL_IFACE_TYPES = ("", "system")
_DPDK_IFACE_TYPES = ("dpdk",)


def findings(declared: Sequence[tuple[LocalVm, VmSpec]], ovs: OvsState | None, ovs_problem: str,
             net: HostNet | None, facts: HostFacts | None, facts_problem: str,
             running: frozenset[int]) -> list[Finding]:
    vhost = [(vm, nic) for vm, spec in declared for nic in spec.ovs_nics]
    taps = [(vm, tap) for vm, spec in declared for tap in spec.tap_qinq]
    found: list[Finding] = []
    if ovs is None:
        if vhost or taps:
            found.append(Finding(Severity.ERROR, OVS, f"{ovs_problem}, but this node's VMs declare "
                                 f"{_count(len(vhost), 'vhost-user NIC')} and {_count(len(taps), 'QinQ tap')}",
                                 "start it: systemctl start openvswitch-switch", "ovs-unreachable"))
        else:
            found.append(Finding(Severity.INFO, OVS, ovs_problem,
                                 "nothing to do while no VM of this node declares vhost-user NICs or QinQ",
                                 "ovs-unreachable"))
    if facts is None and vhost:
        found.append(Finding(Severity.WARNING, "host", facts_problem, "run the doctor as root", "facts-unreadable"))
    if vhost:
        found += _dpdk(ovs, facts)
        found += _hugepages([vm for vm, _ in vhost], facts, running)
    if ovs is not None:
        found += _bridges(vhost, ovs)
        if any(nic.vlan.qinq for _, nic in vhost) or taps:
            found += _vlan_depth(ovs, vhost, taps)
        if net is not None:
            found += _uplink_mtus(vhost, taps, ovs, net)
    return found


# --- OVS-DPDK readiness -------------------------------------------------------------------


def _dpdk(ovs: OvsState | None, facts: HostFacts | None) -> Iterator[Finding]:
    not_dpdk = ovs is not None and _not_dpdk_build(ovs)
    if not_dpdk:
        yield Finding(Severity.ERROR, "ovs-vswitchd",
                      "the running ovs-vswitchd is not the DPDK build: vhost-user ports cannot be made",
                      SWITCH_TO_DPDK, "dpdk-binary")
    if facts is not None:
        alternative = facts.vswitchd_alternative
        if alternative and alternative != DPDK_VSWITCHD:
            yield Finding(Severity.ERROR, "ovs-vswitchd",
                          f"the ovs-vswitchd alternative points to {alternative}, not the DPDK build: "
                          "openvswitch-switch starts a switch without vhost-user ports", SWITCH_TO_DPDK,
                          "dpdk-alternative")
        elif not alternative and facts.packages_known and "openvswitch-switch-dpdk" not in facts.packages:
            yield Finding(Severity.ERROR, "openvswitch-switch-dpdk", "is not installed: no switch can serve vhost-user NICs",
                          SWITCH_TO_DPDK, "dpdk-package")
        if facts.packages_known and not any(p.startswith(MEMPOOL_RING) for p in facts.packages):
            yield Finding(Severity.ERROR, f"package {MEMPOOL_RING}*",
                          "DPDK's ring mempool driver is not installed (the dpdk package only recommends it): "
                          "ovs-vswitchd logs `Failed to create mempool` when a guest starts its NIC, and the port "
                          "passes no traffic although it may show connected",
                          f"apt install {MEMPOOL_RING}23 (Proxmox VE 8, Debian 12) or {MEMPOOL_RING}25 (Proxmox VE 9, "
                          "Debian 13), then systemctl restart openvswitch-switch", "dpdk-mempool-ring")
    if ovs is None:
        return
    init = ovs.other_config.get("dpdk-init", "")
    if init not in ("true", "try"):
        yield Finding(Severity.ERROR, f"{OVS} other_config:dpdk-init",
                      f"is {init or 'unset'}: ovs-vswitchd does not start DPDK, so no vhost-user port comes up",
                      "ovs-vsctl set Open_vSwitch . other_config:dpdk-init=true; systemctl restart openvswitch-switch",
                      "dpdk-init")
    elif ovs.dpdk_initialized is False and not not_dpdk:
        yield Finding(Severity.ERROR, f"{OVS} dpdk_initialized",
                      "is false although dpdk-init is set: DPDK did not start (hugepages, dpdk-socket-mem or "
                      "dpdk-extra)",
                      "read the EAL lines in /var/log/openvswitch/ovs-vswitchd.log, fix them, then "
                      "systemctl restart openvswitch-switch", "dpdk-initialized")
    if facts is not None and (facts.cpus <= SMALL_HOST_CPUS or facts.mem_total_kib <= SMALL_HOST_KIB):
        size = f"{facts.cpus} CPUs, {facts.mem_total_kib // (1024 * 1024)} GiB"
        if "pmd-maxsleep" not in ovs.other_config:
            yield Finding(Severity.WARNING, f"{OVS} other_config:pmd-maxsleep",
                          f"is unset on this small host ({size}): each idle PMD thread keeps a whole core busy",
                          "ovs-vsctl set Open_vSwitch . other_config:pmd-maxsleep=50000", "dpdk-pmd-maxsleep")
        if ovs.other_config.get("per-port-memory") != "true":
            yield Finding(Severity.WARNING, f"{OVS} other_config:per-port-memory",
                          f"is not true on this small host ({size}): the first vhost-user port stalls ovs-vswitchd "
                          "for seconds while DPDK touches its whole shared memory pool",
                          "ovs-vsctl set Open_vSwitch . other_config:per-port-memory=true; "
                          "systemctl restart openvswitch-switch", "dpdk-per-port-memory")


def _not_dpdk_build(ovs: OvsState) -> bool:
    """ovs-vswitchd writes `dpdk_version` "none" when it has no DPDK; an older one that does
    not write it shows it by lacking vhost-user among its interface types (a DPDK build that
    failed to initialise lacks them too, so only while DPDK is not known to have failed)."""
    if ovs.dpdk_version:
        return ovs.dpdk_version == "none"
    return bool(ovs.iface_types) and VHOST_CLIENT not in ovs.iface_types and ovs.dpdk_initialized is not False


def _hugepages(vms: list[LocalVm], facts: HostFacts | None, running: frozenset[int]) -> Iterator[Finding]:
    if facts is None:
        return
    for vm in {vm.vmid: vm for vm in vms}.values():
        if vm.vmid in running:
            continue  # its pages are taken already
        try:
            layout = memory_layout(vm.config.effective())
        except AgentError:
            continue  # `apply` and pre-start say what is wrong with it
        need = shared_memory_need(layout)
        if need.kind != "hugepages":
            continue
        for text in capacity_warnings(vm.vmid, need, facts.memory):
            problem, _, fix = text.rpartition("; ")
            yield Finding(Severity.WARNING, f"VM {vm.vmid}", problem.removeprefix(f"VM {vm.vmid} "), fix,
                          "hugepages")


# --- bridges, VLAN depth, MTUs ---------------------------------------------------------------


def _bridges(vhost: list[tuple[LocalVm, VhostNic]], ovs: OvsState) -> Iterator[Finding]:
    for vm, nic in vhost:
        bridge = ovs.bridge(nic.bridge)
        if bridge is not None and bridge.datapath != VHOST_DATAPATH:
            yield Finding(Severity.ERROR, f"VM {vm.vmid} {nic.name}",
                          f"its bridge {nic.bridge} uses the {bridge.datapath} datapath, but vhost-user ports need a "
                          f"{VHOST_DATAPATH} (userspace) bridge: the VM's start is refused",
                          f"declare the NIC on a {VHOST_DATAPATH} bridge (`pve-vhost-agent nic set {vm.vmid} {nic.name} "
                          "--bridge <new name>`: the agent creates a missing bridge as netdev)", "vhost-bridge-datapath")


def _vlan_depth(ovs: OvsState, vhost: list, taps: list) -> Iterator[Finding]:
    """QinQ needs vlan-limit 0 or 2 and datapaths probed with two VLAN headers (plan/ovs.py's rule)."""
    if not ovs.bridges:
        return  # the agent sets vlan-limit itself before the first bridge exists
    limit = ovs.vlan_limit
    if limit not in (0,) and limit < QINQ_VLAN_LIMIT:
        yield Finding(Severity.ERROR, f"{OVS} other_config:vlan-limit",
                      f"is {limit}, but this node's VMs declare QinQ: dot1q-tunnel ports then pass only one VLAN "
                      "header, so customer-tagged frames lose their tags or are dropped",
                      f"ovs-vsctl set Open_vSwitch . other_config:vlan-limit={QINQ_VLAN_LIMIT}, then {RESTART_FIX}",
                      "ovs-vlan-limit")
        return
    datapaths = {VHOST_DATAPATH for _, nic in vhost if nic.vlan.qinq}
    for vm, tap in taps:
        bridge = ovs.bridge(parse_net(tap.index, vm.config.effective().get(tap.name, "")).bridge)
        if bridge is not None:
            datapaths.add(bridge.datapath)
    for dp in sorted(datapaths & set(ovs.datapaths_in_use())):
        probed = ovs.probed_headers(dp)
        if probed is not None and probed < QINQ_VLAN_LIMIT:
            yield Finding(Severity.ERROR, f"{OVS} {dp} datapath",
                          f"was probed with {probed} VLAN header{'s' if probed != 1 else ''} (vlan-limit was raised "
                          "after ovs-vswitchd created it): QinQ frames keep one tag only", RESTART_FIX,
                          "ovs-vlan-depth")
        elif probed is None:
            yield Finding(Severity.INFO, f"{OVS} {dp} datapath",
                          "the VLAN depth it was probed with is unknown (no Datapath row reports it yet)",
                          "nothing to do: the agent checks it before the next QinQ port is set", "ovs-vlan-depth")


def _uplink_mtus(vhost: list[tuple[LocalVm, VhostNic]], taps: list, ovs: OvsState, net: HostNet) -> Iterator[Finding]:
    """Every uplink of a declared NIC's bridge must carry the NIC's MTU (plus the S-tag for QinQ)."""
    uplinks: dict[str, list] = {}  # bridge -> its uplinks, found once (a node has thousands of NICs)

    def of(bridge: str) -> list:
        if bridge not in uplinks:
            uplinks[bridge] = list(_ovs_uplinks(bridge, ovs, net))
        return uplinks[bridge]

    for vm, nic in vhost:
        mtu = nic.mtu or DEFAULT_MTU
        yield from _uplinks_short(f"VM {vm.vmid} {nic.name}", nic.bridge, mtu, QINQ_HEADER if nic.vlan.qinq else 0,
                                  of(nic.bridge))
    for vm, tap in taps:
        value = vm.config.effective().get(tap.name, "")
        bridge = parse_net(tap.index, value).bridge
        own = net.link(bridge)
        # Proxmox gives a tap without `mtu=` its bridge's MTU.
        mtu = mtu_of(value) or (own.mtu if own is not None else DEFAULT_MTU)
        yield from _uplinks_short(f"VM {vm.vmid} {tap.name}", bridge, mtu, QINQ_HEADER, of(bridge))


def _uplinks_short(subject: str, bridge: str, mtu: int, extra: int, uplinks: list) -> Iterator[Finding]:
    need = mtu + extra
    for name, have, where in uplinks:
        if have < need:
            why = f"MTU {mtu} + {extra} for the S-tag" if extra else f"its MTU {mtu}"
            yield Finding(Severity.ERROR, subject,
                          f"uplink {name} of bridge {bridge} has MTU {have}, but the NIC's frames need {need} ({why}): "
                          "full-size frames are dropped",
                          f"raise it: {where(need)}" + (f"; or give the NIC MTU {have - extra}" if extra else ""),
                          "mtu-ovs-uplink")


def _ovs_uplinks(bridge: str, ovs: OvsState, net: HostNet):
    """(name, MTU, how to raise it) of the bridge's ports that leave the host: kernel NICs
    and bonds as netlink shows them (a bond's slaves: the bond-slave MTU check), DPDK
    ports as OVS reports them."""
    for port in ovs.ports:
        if port.bridge != bridge:
            continue
        for iface in port.interfaces:
            if iface.type in _DPDK_IFACE_TYPES and iface.mtu:
                yield iface.name, iface.mtu, lambda need, n=iface.name: f"ovs-vsctl set Interface {n} mtu_request={need}"
                continue
            link = net.link(iface.name)
            if iface.type in _KERNEL_IFACE_TYPES and link is not None and is_uplink(link):
                yield link.name, link.mtu, lambda need, n=link.name: (
                    f"`mtu {need}` on {n} in /etc/network/interfaces, then `ifreload -a`")


def mtu_of(value: str) -> int | None:
    """The `mtu=` of a VM config's netN (1 means: the bridge's), None when not set."""
    mtu = parse_property_string(value).get("mtu", "")
    return int(mtu) if mtu.isdigit() and int(mtu) > 1 else None


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
