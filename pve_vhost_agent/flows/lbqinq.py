"""QinQ on Proxmox's tap NICs of Linux bridges in the hook phases: observe the links,
plan (plan/lbqinq.py), apply, all under the agent's netdev lock, so a post-stop never
removes an S-VLAN bridge another VM's post-start is about to use.

Each function takes the VM's spec and the config its QEMU runs with and returns the spec
left for Open vSwitch (the taps on bridges that are not Linux bridges). A VM without QinQ
on a tap reads no link (and imports no netlink library).
"""

from __future__ import annotations

import logging
from typing import Mapping

from pve_vhost_agent.adapters.linkstate import read_link_state
from pve_vhost_agent.flows.apply import apply_plan
from pve_vhost_agent.model.netdevs import LinkState
from pve_vhost_agent.model.spec import VmSpec
from pve_vhost_agent.plan.lbqinq import linux_taps, plan_cleanup, plan_taps, svlan_keys, without_taps
from pve_vhost_agent.settings import Settings

Logger = logging.Logger | logging.LoggerAdapter


def start_links(vm: VmSpec) -> LinkState | None:
    """Pre-start: the links its QinQ taps are checked against (None: it has none)."""
    return read_link_state() if vm.tap_qinq else None


def ovs_part(vm: VmSpec, config: Mapping[str, str], links: LinkState | None) -> VmSpec:
    """The VM's spec without its QinQ taps on Linux bridges."""
    return without_taps(vm, linux_taps(vm, config, links))


def post_start(settings: Settings, vm: VmSpec, config: Mapping[str, str], logger: Logger) -> VmSpec:
    """QinQ on the taps pve-bridge plugged into Linux bridges."""
    if not vm.tap_qinq:
        return vm
    from pve_vhost_agent.adapters.linkchange import netdev_lock  # netlink writes: only here

    with netdev_lock(settings):
        links = read_link_state(tap.port_name for tap in vm.tap_qinq)
        entries = linux_taps(vm, config, links)
        actions = plan_taps(vm.vmid, entries, config, links)
        if entries and not actions:
            logger.info("Linux bridges already as planned", extra={"result": "unchanged"})
        apply_plan(settings, actions, logger, netdev_locked=True)
    return without_taps(vm, entries)


def post_stop(settings: Settings, vm: VmSpec, config: Mapping[str, str], logger: Logger) -> VmSpec:
    """Give back what is left of the VM's QinQ taps (QEMU's exit removed them, normally)
    and remove the S-VLAN devices they used, unless another VM's QinQ tap uses them."""
    if not vm.tap_qinq:
        return vm
    from pve_vhost_agent.adapters.linkchange import netdev_lock

    with netdev_lock(settings):
        links = read_link_state()
        actions = plan_cleanup(links, lambda vmid: vmid == vm.vmid, only=svlan_keys(vm, config))
        apply_plan(settings, actions, logger, netdev_locked=True)
    return ovs_part(vm, config, links)
