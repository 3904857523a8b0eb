"""Scale, not timed: 1,000 vhost-user ports in one transaction, removed again, leave no trace.

Runs on a private userspace ovs-vswitchd: it cannot open dpdkvhostuserclient interfaces
(each gets an `error`), which is fine here, where the database is what is compared.
"""

import json

from fixtures.ovs import run
from pve_vhost_agent.model.actions import AddVhostPort
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ovs import plan_gc
from pve_vhost_agent.model.ovs import PortVlan

# Counters and statistics move on their own; everything else must come back unchanged.
VOLATILE = {"next_cfg", "cur_cfg", "statistics"}


def dump(inst) -> dict:
    tables = {}
    for line in run("ovsdb-client", "dump", "--format=json", inst.remote, "Open_vSwitch").splitlines():
        table = json.loads(line)
        keep = [i for i, h in enumerate(table["headings"]) if h not in VOLATILE]
        tables[table["caption"]] = sorted(json.dumps([row[i] for i in keep]) for row in table["data"])
    return tables


def test_a_thousand_ports_come_and_go_without_a_trace(fresh_ovs):
    inst = fresh_ovs("scale")
    inst.vsctl("add-br", "h3s0", "--", "set", "Bridge", "h3s0", "datapath_type=netdev")
    before = dump(inst)
    adds = [AddVhostPort(f"vhu{vmid}i0", "h3s0", vmid, "net0", f"/tmp/h3-none/vm-{vmid}-0.sock", PortVlan("access", 10))
            for vmid in range(1000, 2000)]
    with Ovsdb(inst.remote, timeout=60) as db:
        cfg = db.snapshot().next_cfg
        db.apply(adds)
        state = db.snapshot()
        assert state.next_cfg == cfg + 1  # one transaction
        assert len(state.owned_ports()) == 1000
        assert all(p.bridge == "h3s0" and p.vlan == PortVlan("access", 10) for p in state.owned_ports())

        removal = plan_gc([], state)
        assert len(removal) == 1000
        db.apply(removal)
        assert db.snapshot().next_cfg == cfg + 2
    assert dump(inst) == before
