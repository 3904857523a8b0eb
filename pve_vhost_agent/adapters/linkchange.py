"""Changing links for QinQ on Proxmox's Linux bridges, through netlink (pyroute2).

The actions of plan/lbqinq are applied under the agent's netdev lock (an flock on
/var/lock/pve-vhost-agent-netdev.lck: hooks and the service never change these devices at
once), each against a fresh reading of the links. What they create may exist already;
a device is changed or removed only while it carries the agent's mark (model/netdevs), and
an S-VLAN bridge is removed only while no QinQ tap uses it. The agent's devices get no
IPv6 link-local address (addrgenmode none): the host must not speak into a customer's
S-VLAN.
"""

from __future__ import annotations

import contextlib
import errno
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pve_vhost_agent.adapters import tapfilter
from pve_vhost_agent.adapters.filelock import flocked
from pve_vhost_agent.adapters.linkstate import VLAN_INFO_PVID, VLAN_INFO_UNTAGGED, observe
from pve_vhost_agent.errors import AgentError, AgentTimeout, NetworkRefused, NotFound
from pve_vhost_agent.model.actions import Action
from pve_vhost_agent.model.lbactions import AddSVlanBridge, DelSVlanBridge, RestoreLinuxTap, SetLinuxTapQinQ
from pve_vhost_agent.model.netdevs import (
    ROLE_PEER, ROLE_SBRIDGE, ROLE_SVLAN, ROLE_TAP, ROLE_TRUNK, TPID, BridgeVlan, LinkInfo, LinkMark, SVlanBridge,
    filter_rules, svlan_key,
)
from pve_vhost_agent.settings import Settings

LOCK_FILE = "/var/lock/pve-vhost-agent-netdev.lck"  # next to Proxmox's own (/var/lock/pve-network.lck)
LOCK_TIMEOUT = 5.0  # seconds; the lock is held only for netlink calls
VLAN_MIN, VLAN_MAX = 1, 4094
IN6_ADDR_GEN_MODE_NONE = 1


def netdev_lock(settings: Settings):
    """The agent's netdev lock: held while links are observed, planned for and changed."""
    path = settings.host_path(LOCK_FILE)
    return flocked(path, LOCK_TIMEOUT, lambda: AgentTimeout(
        f"the netdev lock {path} is held by another agent process",
        "retry; if it stays held, see which process holds it (fuser)"), "netdev lock")


class LinkChanger:
    """Applies netlink actions over one IPRoute (call under the netdev lock)."""

    def __init__(self) -> None:
        try:
            self.ipr = IPRoute()
        except (OSError, NetlinkError) as err:
            raise AgentError(f"cannot open netlink: {err}", "run as root on the host") from err

    def __enter__(self) -> "LinkChanger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.ipr.close()

    def apply(self, action: Action) -> str:
        """'done', 'unchanged', or 'skipped: why'; raises AgentError when it cannot be done."""
        handlers = {AddSVlanBridge: self._add_svlan, SetLinuxTapQinQ: self._set_tap, RestoreLinuxTap: self._restore_tap,
                    DelSVlanBridge: self._del_svlan}
        try:
            return handlers[type(action)](action)
        except NetlinkError as err:
            raise NetworkRefused(f"{action.sentence()}: the kernel said {os.strerror(err.code)}",
                                 "see `ip -d link show` and `bridge vlan show`; the next pass or start tries again") from err

    # --- one per action ----------------------------------------------------------------

    def _add_svlan(self, action: AddSVlanBridge) -> str:
        svlan, ipr = action.svlan, self.ipr
        state = observe(ipr)
        for role in svlan.roles:
            link = state.get(svlan.name(role))
            if link is not None and link.mark != svlan.mark(role):
                raise NetworkRefused(f"{link.name} is not the agent's (no matching pve-vhost-agent alias)",
                                     f"rename or remove {link.name}; the agent never takes over a device")
        bridge, lower_name = state.get(svlan.bridge), svlan.lower
        if bridge is None:
            raise NotFound(f"bridge {svlan.bridge} is gone", "check /etc/network/interfaces")
        done = False
        sbridge = state.get(svlan.name())
        if sbridge is None:
            ipr.link("add", ifname=svlan.name(), kind="bridge", br_stp_state=0, br_mcast_snooping=0)
            sbridge = self._marked(svlan.name(), svlan.mark(ROLE_SBRIDGE))
            done = True
        if svlan.through_bridge:
            done |= self._ensure_veth(svlan, bridge)
        state = observe(ipr)
        lower = state.get(lower_name)
        if lower is None:
            raise NotFound(f"{lower_name}, the lower device of S-VLAN {svlan.stag}, is gone", "check the bridge's uplink")
        device = state.get(svlan.name(ROLE_SVLAN))
        if device is not None and (device.lower, device.vlan_id, device.vlan_protocol) != (
                lower.index, svlan.stag, TPID[svlan.ethertype]):
            ipr.link("del", index=device.index)  # the agent's own, on an old uplink
            device = None
        if device is None:
            ipr.link("add", ifname=svlan.name(ROLE_SVLAN), kind="vlan", link=lower.index, vlan_id=svlan.stag,
                     vlan_protocol=TPID[svlan.ethertype])
            device = self._marked(svlan.name(ROLE_SVLAN), svlan.mark(ROLE_SVLAN))
            done = True
        if device.master != sbridge.index:
            ipr.link("set", index=device.index, master=sbridge.index)
            done = True
        for name in [*((svlan.name(ROLE_PEER), svlan.name(ROLE_TRUNK)) if svlan.through_bridge else ()),
                     svlan.name(), svlan.name(ROLE_SVLAN)]:
            done |= self._up(name, lower_name)
        return "done" if done else "unchanged"

    def _ensure_veth(self, svlan: SVlanBridge, bridge: LinkInfo) -> bool:
        ipr, done = self.ipr, False
        trunk_name, peer_name = svlan.name(ROLE_TRUNK), svlan.name(ROLE_PEER)
        state = observe(ipr)
        trunk, peer = state.get(trunk_name), state.get(peer_name)
        if trunk is None or peer is None or trunk.lower != peer.index:
            for stale in (trunk, peer):
                if stale is not None:
                    ipr.link("del", index=stale.index)
            ipr.link("add", ifname=trunk_name, kind="veth", peer=peer_name)
            for name, role in ((peer_name, ROLE_PEER), (trunk_name, ROLE_TRUNK)):
                self._marked(name, svlan.mark(role))
                ipr.link("set", index=self._index(name), mtu=svlan.mtu)
            done = True
        trunk = observe(ipr).get(trunk_name)
        if trunk.master != bridge.index:
            ipr.link("set", index=trunk.index, master=bridge.index)
            done = True
        wanted = (BridgeVlan(svlan.stag),)
        trunk = observe(ipr).get(trunk_name)
        if trunk.vlans != wanted:
            set_port_vlans(ipr, trunk.index, wanted)
            done = True
        return done

    def _set_tap(self, action: SetLinuxTapQinQ) -> str:
        ipr = self.ipr
        state = observe(ipr, (action.port,))
        tap = state.get(action.port)
        if tap is None:
            raise NotFound(f"VM {action.vmid} {action.nic}: {action.port} is gone", f"is VM {action.vmid} still running?")
        target = state.get(action.master)
        if target is None or not target.is_bridge:
            raise NotFound(f"{action.master}, where {action.port} goes for QinQ, is not a bridge (any more)",
                           "the service makes the agent's S-VLAN bridges again in its next pass; Proxmox makes "
                           "<bridge>v<tag> when a NIC with that tag starts")
        qinq = action.qinq
        mark = LinkMark(ROLE_TAP, action.bridge, qinq.stag, qinq.ethertype, action.vmid, action.nic, qinq.cvlans,
                        action.master, action.saved)
        done = False
        rules = filter_rules(qinq.cvlans)
        recorded = tap.mark.cvlans if tap.mark and tap.mark.role == ROLE_TAP else None  # what its filters pass
        if recorded != qinq.cvlans or {(f.direction, f.pref, f.kind) for f in tap.filters} != {
                (r.direction, r.pref, r.kind) for r in rules}:
            # Before the tap joins the S-VLAN: no frame of another C-VLAN passes meanwhile.
            tapfilter.set_filters(ipr, tap.index, tap.name, rules)
            done = True
        if tap.alias != mark.alias():
            ipr.link("set", index=tap.index, ifalias=mark.alias())
            done = True
        if tap.master != target.index:
            ipr.link("set", index=tap.index, master=target.index)
            done = True
        return "done" if done else "unchanged"

    def _restore_tap(self, action: RestoreLinuxTap) -> str:
        ipr = self.ipr
        state = observe(ipr, (action.port,))
        tap = state.get(action.port)
        if tap is None or tap.mark is None or tap.mark.role != ROLE_TAP:
            return "unchanged"  # gone with QEMU, or no longer the agent's to give back
        target = state.get(action.saved.master)
        result = "done"
        if target is not None and target.is_bridge:
            if tap.master != target.index:
                ipr.link("set", index=tap.index, master=target.index)
            if target.vlan_filtering:
                set_port_vlans(ipr, tap.index, action.saved.vlans)
        else:
            result = f"done, but {action.saved.master or 'its bridge'} is gone: {tap.name} is left where it is"
        tapfilter.clear_filters(ipr, tap.index)
        ipr.link("set", index=tap.index, ifalias="")
        return result

    def _del_svlan(self, action: DelSVlanBridge) -> str:
        ipr = self.ipr
        state = observe(ipr)
        key = (action.bridge, action.stag, next(e for e in TPID if e.value == action.ethertype))
        users = [tap.name for tap in state.marked(ROLE_TAP) if svlan_key(tap.mark) == key]
        if users:
            return f"skipped: {', '.join(users)} uses it"
        ours = [state.get(name) for name in action.devices]
        ours = [link for link in ours if link is not None and link.mark is not None and svlan_key(link.mark) == key]
        sbridge = next((link for link in ours if link.mark.role == ROLE_SBRIDGE), None)
        foreign = [port.name for port in (state.ports(sbridge) if sbridge else ()) if port.mark is None]
        if foreign:
            return f"skipped: {sbridge.name} has ports that are not the agent's ({', '.join(foreign)})"
        if not ours:
            return "unchanged"
        for link in ours:  # the plan's order: S-VLAN device, veth, S-VLAN bridge
            with contextlib.suppress(NetlinkError):  # a veth peer goes with its other end
                ipr.link("del", index=link.index)
        return "done"

    # --- helpers -----------------------------------------------------------------------

    def _index(self, name: str) -> int:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise NotFound(f"{name} vanished while the agent set it up", "retry")
        return found[0]

    def _marked(self, name: str, mark: LinkMark) -> LinkInfo:
        """Right after creating `name`: the agent's mark and no IPv6 link-local address."""
        index = self._index(name)
        self.ipr.link("set", index=index, ifalias=mark.alias())
        self.ipr.link("set", index=index, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [
            ["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]})
        return observe(self.ipr).get(name)

    def _up(self, name: str, lower: str) -> bool:
        link = observe(self.ipr).get(name)
        if link is None or link.up:
            return False
        try:
            self.ipr.link("set", index=link.index, state="up")
        except NetlinkError as err:
            if err.code == errno.ENETDOWN:
                raise NetworkRefused(f"{name} cannot come up: its lower device {lower} is down",
                                     f"bring {lower} up (ifup {lower})") from err
            raise
        return True


def set_port_vlans(ipr, index: int, vlans: tuple[BridgeVlan, ...]) -> None:
    """Exactly these VLAN entries on a port of a VLAN-aware bridge, as pve-bridge sets them
    (all removed, then each added)."""
    ipr.vlan_filter("del", index=index, IFLA_AF_SPEC={"attrs": [
        ["IFLA_BRIDGE_VLAN_INFO", {"vid": VLAN_MIN, "flags": 0x8}],
        ["IFLA_BRIDGE_VLAN_INFO", {"vid": VLAN_MAX, "flags": 0x10}]]})
    for vlan in vlans:
        flags = (VLAN_INFO_PVID if vlan.pvid else 0) | (VLAN_INFO_UNTAGGED if vlan.untagged else 0)
        ipr.vlan_filter("add", index=index, vlan_info={"vid": vlan.vid, "flags": flags})
