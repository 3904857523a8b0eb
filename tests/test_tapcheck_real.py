"""The tap QinQ checks against real components: the post-start link check with a tap and
veth "uplinks" on a bridge of a private ovs-vswitchd, read through netlink (pyroute2) in
its network namespace; and the pre-start hook against an OVS whose vlan-limit is 1."""

import os
import subprocess

import pytest

from conftest import REPO
from pve_vhost_agent.errors import AgentError, ExitCode
from pve_vhost_agent.adapters.host import read_links
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.model.spec import QinQ, TapQinQ, VmSpec
from pve_vhost_agent.plan.tapqinq import link_warnings

BRIDGE, TAP = "h12qsbr", "tap902i0"
SMALL, ROOMY = "h12qsup1", "h12qsup2"  # uplinks with MTU 1500 and 1504
VM = VmSpec(902, (), (TapQinQ(902, 0, QinQ(950)),))


@pytest.fixture
def bridge(ovs):
    ovs.vsctl("add-br", BRIDGE, "--", "set", "Bridge", BRIDGE, "datapath_type=netdev")
    try:
        ovs.ip("tuntap", "add", "dev", TAP, "mode", "tap")
        ovs.ip("link", "set", TAP, "up", "mtu", "1500")
        ovs.vsctl("add-port", BRIDGE, TAP, "tag=950")
        for name, mtu in ((SMALL, "1500"), (ROOMY, "1504")):
            ovs.ip("link", "add", name, "mtu", mtu, "type", "veth", "peer", "name", f"{name}p", "mtu", mtu)
            ovs.ip("link", "set", name, "up")
            ovs.vsctl("add-port", BRIDGE, name)
        with Ovsdb(ovs.remote, timeout=10) as db:
            yield ovs, db
    finally:
        ovs.vsctl("--if-exists", "del-br", BRIDGE)
        for name in (TAP, SMALL, ROOMY):  # a veth's peer goes with it
            subprocess.run(["ip", "-n", ovs.netns, "link", "del", name], capture_output=True)


def check(ovs, db):
    return [(w.link, w.text) for w in link_warnings(VM, db.snapshot(), read_links(ovs.netns))]


def test_an_uplink_without_room_for_the_s_tag_is_named_and_one_with_room_is_not(bridge):
    ovs, db = bridge
    links = read_links(ovs.netns)
    assert (links[TAP].mtu, links[TAP].kind, links[TAP].up) == (1500, "tun", True)
    assert (links[SMALL].mtu, links[SMALL].kind, links[ROOMY].mtu) == (1500, "veth", 1504)
    assert check(ovs, db) == [(SMALL, f"VM 902 net0: uplink {SMALL} of bridge {BRIDGE} has MTU 1500, but QinQ frames "
                                      f"from {TAP} (MTU 1500) need 1504 with the S-tag: full-size frames are dropped; "
                                      f"set `mtu 1504` on {SMALL} in /etc/network/interfaces, then `ifreload -a`")]
    ovs.ip("link", "set", SMALL, "mtu", "9000")
    assert check(ovs, db) == []
    ovs.ip("link", "set", TAP, "mtu", "9000")  # a jumbo tap needs jumbo + 4 on every uplink
    assert [link for link, _ in check(ovs, db)] == [SMALL, ROOMY]


def test_a_tap_that_is_down_is_reported(bridge):
    ovs, db = bridge
    ovs.ip("link", "set", TAP, "down")
    assert [text for _, text in check(ovs, db)][0].startswith(f"VM 902 net0: {TAP} is down")


# --- pre-start against a real OVS whose datapath cannot take two VLAN headers ---------------


def pre_start(pve_root, ovs) -> subprocess.CompletedProcess:
    """The hookscript's pre-start for VM 100, as Proxmox calls it, against `ovs`."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONPATH": str(REPO), "PVE_MIGRATED_FROM": "",
           "PVE_VHOST_AGENT_ROOT": str(pve_root.root), "PVE_VHOST_AGENT_NODE": pve_root.node,
           "PVE_VHOST_AGENT_OVSDB": ovs.remote}
    hook = [str(REPO / "hookscripts" / "pve-vhost-agent"), "100", "pre-start"]
    return subprocess.run(hook, input=b"", capture_output=True, env=env, timeout=60)


@pytest.mark.parametrize("vlan_limit", ["unset", "2"])
def test_pre_start_refuses_tap_qinq_when_vlan_limit_1_already_shaped_the_datapath(pve_root, fresh_ovs, vlan_limit):
    ovs = fresh_ovs("h12qsvl", other_config={} if vlan_limit == "unset" else {"vlan-limit": vlan_limit})
    ovs.vsctl("add-br", "vmbr0", "--", "set", "Bridge", "vmbr0", "datapath_type=netdev")
    pve_root.write_vm(100, "memory: 512\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=950\n")
    assert pve_root.cli("qinq", "set", "100", "net0", "--qinq", "950").returncode == 0
    result = pre_start(pve_root, ovs)
    lines = result.stdout.decode().splitlines()
    if vlan_limit == "2":
        assert result.returncode == 0 and "QinQ can hold on tap100i0" in lines[-1], lines
        return
    assert result.returncode == ExitCode.REFUSED, lines
    assert [line for line in lines if line.startswith("ERROR: ")] == [lines[-1]]
    assert "start aborted" in lines[-1] and "vlan-limit 2 or 0, but it is 1" in lines[-1]
    assert "systemctl restart openvswitch-switch" in lines[-1]
    # Nothing changed in OVS: raising the limit at runtime would break the running datapath.
    assert "vlan-limit" not in ovs.get("Open_vSwitch", ".", "other_config")["other_config"]


def test_reading_links_of_a_missing_namespace_is_one_error_and_creates_nothing():
    with pytest.raises(AgentError, match="cannot read the network links through netlink"):
        read_links("h12qs-missing")
    assert not os.path.exists("/run/netns/h12qs-missing")
