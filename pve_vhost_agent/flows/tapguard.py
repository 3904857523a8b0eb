"""The hook's checks of QinQ on Proxmox's tap NICs: observe, decide with tapcheck, report.

- before the start (pre-start): read OVS and refuse a start whose QinQ could not hold
  (the error aborts the start);
- after it (post-start): read the tap and its bridge's uplinks through netlink and warn
  about MTUs too small for the S-tag.
"""

from __future__ import annotations

import logging
from typing import Mapping

from pve_vhost_agent.plan import tapqinq as tapcheck
from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.adapters.host import read_links
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.model.ovs import OvsState
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import VmSpec


def check_taps_before_start(settings: Settings, vm: VmSpec, config: Mapping[str, str],
                            log: logging.LoggerAdapter) -> None:
    """Raise (pre-start: the start is aborted) unless every declared tap QinQ can hold."""
    if not vm.tap_qinq:
        return
    with Ovsdb.from_settings(settings) as db:
        state = db.snapshot()
    tapcheck.check_before_start(vm, config, state)  # its error is the one line of the abort
    log.info("VM %s: QinQ can hold on %s", vm.vmid, ", ".join(e.port_name for e in vm.tap_qinq),
             extra={"action": "CheckTapQinQ", "result": "ok"})


def warn_tap_links(vm: VmSpec, state: OvsState, log: logging.LoggerAdapter) -> None:
    """Log a warning for each tap link or uplink that would lose QinQ frames."""
    if not vm.tap_qinq:
        return
    try:
        links = read_links()
    except AgentError as err:  # a check that cannot run is a warning, not a failed post-start
        log.warning("VM %s: tap links not checked: %s", vm.vmid, err, extra={"action": "CheckTapLinks", "result": "failed"})
        return
    for warning in tapcheck.link_warnings(vm, state, links):
        log.warning("%s", warning.text, extra={"nic": warning.nic, "port": warning.port,
                                               "action": "CheckTapLinks", "result": "warning"})
