"""`pve-vhost-agent ovs status VMID`: what the agent made for a VM, read from a real OVS-DPDK."""

import json
import subprocess
import time

from conftest import REPO
from pve_vhost_agent.errors import ExitCode
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ovs import plan_vhost_ports, plan_vm_removal
from pve_vhost_agent.model.spec import EtherType, QinQ, VhostNic, VlanPolicy, VmSpec


def cli(*args):
    return subprocess.run(["/usr/bin/python3", "-m", "pve_vhost_agent", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def status_json(inst):
    result = cli("--ovsdb", inst.remote, "ovs", "status", "100", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_lists_the_vms_vhost_user_ports(ovs_dpdk, ovs_tmp):
    nic = VhostNic(100, 2, "h3cli0", "02:00:00:00:64:02", vlan=VlanPolicy(qinq=QinQ(950, (), EtherType.DOT1Q)))
    with Ovsdb(ovs_dpdk.remote, timeout=10) as db:
        db.apply(plan_vhost_ports(VmSpec(100, (nic,)), db.snapshot(), ovs_tmp))
        try:
            deadline = time.monotonic() + 10
            # ovs-vswitchd fills in the vhost-user status shortly after it adds the port.
            while not (report := status_json(ovs_dpdk))["ports"][0]["vhost_status"]:
                assert time.monotonic() < deadline, report
                time.sleep(0.1)
            text = cli("--ovsdb", ovs_dpdk.remote, "ovs", "status", "100")
            other = cli("--ovsdb", ovs_dpdk.remote, "ovs", "status", "101")
        finally:
            db.apply(plan_vm_removal(100, db.snapshot()))
            ovs_dpdk.vsctl("--if-exists", "del-br", "h3cli0")
    port = report["ports"][0]
    assert (port["port"], port["nic"], port["bridge"], port["type"]) == ("vhu100i2", "net2", "h3cli0", "dpdkvhostuserclient")
    assert (port["vhost_mode"], port["vhost_status"]) == ("client", "disconnected")
    assert port["vlan"] == "S-tag 950 (802.1q)" and port["socket"] == f"{ovs_tmp}/vm-100-2.sock"
    assert (port["vlan_mode"], port["tag"], port["cvlans"], port["qinq_ethtype"]) == ("dot1q-tunnel", 950, [], "802.1q")
    assert text.returncode == 0 and text.stdout.startswith(
        f"vhu100i2 net2 on h3cli0: vhost-user client disconnected, socket {ovs_tmp}/vm-100-2.sock; S-tag 950 (802.1q)")
    assert other.stdout == "VM 101: no Open vSwitch ports made or changed by pve-vhost-agent\n"


def test_status_with_ovs_down_is_one_line_and_its_exit_code(ovs_tmp):
    result = cli("--ovsdb", f"unix:{ovs_tmp}/db.sock", "ovs", "status", "100")
    assert result.returncode == ExitCode.OVS_UNAVAILABLE
    assert result.stderr == (f"pve-vhost-agent: cannot reach OVSDB at unix:{ovs_tmp}/db.sock (No such file or "
                             "directory); is openvswitch-switch running? (systemctl status openvswitch-switch)\n")
