"""A hook's OVSDB connection sees only its VM's rows, yet changes the switch correctly.

A busy host's switch holds thousands of ports; a hook must not read them all. These run
against a real ovsdb-server and ovs-vswitchd with other VMs' ports on the same bridge.
"""

import json
import os
import signal
import subprocess

import pytest

from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.model.actions import AddVhostPort, DelPort, EnsureBridge, ReplaceVhostPort, SetPortVlan
from pve_vhost_agent.model.names import vm_port_names
from pve_vhost_agent.model.ovs import PortVlan
from pve_vhost_agent.plan.ovs import plan_vm_removal
from testbed.ovs import SCHEMA

BRIDGE, OTHER = "h3sc0", "h3sc1"
OTHERS = 40  # other VMs' ports on the same bridge


@pytest.fixture
def busy_bridge(ovs):
    """A netdev bridge holding other VMs' ports, plus a second bridge; removed afterwards."""
    args = ["add-br", BRIDGE, "--", "set", "Bridge", BRIDGE, "datapath_type=netdev",
            "--", "add-br", OTHER, "--", "set", "Bridge", OTHER, "datapath_type=netdev"]
    for n in range(OTHERS):
        args += ["--", "add-port", BRIDGE, f"vhu{300 + n}i0", "--", "set", "Interface", f"vhu{300 + n}i0", "type=internal"]
    ovs.vsctl(*args)
    yield
    ovs.vsctl("--if-exists", "del-br", BRIDGE, "--", "--if-exists", "del-br", OTHER)


def scoped(ovs, vmid=100) -> Ovsdb:
    return Ovsdb(ovs.remote, timeout=10, ports=vm_port_names(vmid))


def add(port, bridge=BRIDGE, vmid=100, index=0):
    return AddVhostPort(port, bridge, vmid, f"net{index}", f"/tmp/h3-sockets/vm-{vmid}-{index}.sock", PortVlan("access", 10))


def test_a_scoped_snapshot_holds_only_the_vms_rows(ovs, busy_bridge):
    with scoped(ovs) as db:
        db.apply([add("vhu100i0")])
        state = db.snapshot()
    assert [p.name for p in state.ports] == ["vhu100i0"]
    assert state.port("vhu100i0").bridge == BRIDGE  # asked of the server: Bridge.ports is not replicated
    assert {b.name for b in state.bridges} >= {BRIDGE, OTHER}
    # The switch itself has everything: the others' ports and the new one on the bridge.
    assert len(ovs.get("Bridge", BRIDGE, "ports")["ports"]) == OTHERS + 2  # + the bridge's own port
    with Ovsdb(ovs.remote, timeout=10) as full:
        assert len(full.snapshot().ports) >= OTHERS + 3


def test_a_scoped_connection_removes_moves_and_changes_its_ports_only(ovs, busy_bridge):
    with scoped(ovs) as db:
        db.apply([add("vhu100i0"), add("vhu100i1", index=1)])
        db.apply([SetPortVlan("vhu100i1", PortVlan("access", 20), 100)])
        # A new bridge for net0: the port is removed from the bridge the server says holds it.
        db.apply([ReplaceVhostPort("bridge changed", add("vhu100i0", OTHER))])
        assert {p.name: p.bridge for p in db.snapshot().ports} == {"vhu100i0": OTHER, "vhu100i1": BRIDGE}
        db.apply(plan_vm_removal(100, db.snapshot()))
        assert db.snapshot().ports == ()
    assert ovs.get("Port", "vhu300i0", "name") == {"name": "vhu300i0"}
    assert len(ovs.get("Bridge", BRIDGE, "ports")["ports"]) == OTHERS + 1
    assert ovs.find("Port", "name=vhu100i0") == ovs.find("Port", "name=vhu100i1") == []


def test_a_scoped_connection_creates_a_bridge_with_its_own_port(ovs):
    try:
        with scoped(ovs) as db:
            db.apply([EnsureBridge("h3sc2", "netdev"), add("vhu100i0", "h3sc2")])
            assert db.snapshot().port("vhu100i0").bridge == "h3sc2"
        assert sorted(ovs.find("Port", "name=h3sc2") + ovs.find("Port", "name=vhu100i0")) == ["h3sc2", "vhu100i0"]
        assert len(ovs.get("Bridge", "h3sc2", "ports")["ports"]) == 2
    finally:
        ovs.vsctl("--if-exists", "del-br", "h3sc2")


def test_a_scoped_connection_does_not_see_a_foreign_port_of_another_vm(ovs, busy_bridge):
    with scoped(ovs, 300) as db:
        assert [p.name for p in db.snapshot().ports] == ["vhu300i0"]
        with pytest.raises(Exception, match="not the agent's"):
            db.apply([DelPort("vhu300i0", BRIDGE, 300)])  # an operator's port: never removed
    assert ovs.get("Port", "vhu300i0", "name") == {"name": "vhu300i0"}


def test_a_server_whose_schema_lacks_columns_the_agent_knows_is_read_all_the_same(tmp_path):
    # An older Open vSwitch: no Port.cvlans, no DPDK columns, no Datapath table. The agent
    # cuts the server's schema to what it registers and the server has, and reads the rest.
    schema = json.loads(SCHEMA.read_text())
    del schema["tables"]["Port"]["columns"]["cvlans"]
    for column in ("datapaths", "dpdk_initialized", "dpdk_version"):
        del schema["tables"]["Open_vSwitch"]["columns"][column]
    del schema["tables"]["Datapath"]
    (tmp_path / "old.ovsschema").write_text(json.dumps(schema))
    subprocess.run(["ovsdb-tool", "create", str(tmp_path / "conf.db"), str(tmp_path / "old.ovsschema")], check=True)
    sock, pidfile = tmp_path / "db.sock", tmp_path / "ovsdb-server.pid"
    subprocess.run(["ovsdb-server", str(tmp_path / "conf.db"), f"--remote=punix:{sock}", "-vconsole:off",
                    f"--pidfile={pidfile}", f"--unixctl={tmp_path / 'ctl'}", "--detach", f"--log-file={tmp_path / 'ovsdb-server.log'}"], check=True)
    try:
        vsctl = ["ovs-vsctl", f"--db=unix:{sock}", "--no-wait"]
        subprocess.run([*vsctl, "init", "--", "add-br", BRIDGE, "--", "add-port", BRIDGE, "vhu100i1"], check=True)
        with Ovsdb(f"unix:{sock}", timeout=10, ports=vm_port_names(100)) as db:
            state = db.snapshot()
        assert [p.name for p in state.ports] == ["vhu100i1"] and state.port("vhu100i1").bridge == BRIDGE
        assert state.port("vhu100i1").vlan.cvlans == () and state.dpdk_initialized is None
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
