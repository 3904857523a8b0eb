#!/usr/bin/python3
"""Prints what one port change costs through ovs-vsctl and through the agent's IDL connection,
as the number of ports on the bridge grows (platform-facts: every ovs-vsctl call downloads the
whole database). Figures only, no asserts. Run as root: bench/ovsdb_cost.py [--ports 100,500,1000]

Starts its own private ovsdb-server + ovs-vswitchd (userspace, in a private network namespace)
with testbed/ovs.py and stops it by PID at the end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.ovs import start_ovs  # noqa: E402  (a private OVS)
from pve_vhost_agent.model.actions import AddVhostPort, DelPort  # noqa: E402
from pve_vhost_agent.adapters.ovsdb import Ovsdb  # noqa: E402
from pve_vhost_agent.adapters.ovsrows import write  # noqa: E402
from pve_vhost_agent.model.ovs import PortVlan  # noqa: E402

BRIDGE = "benchbr0"
ROUNDS = 15


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def vsctl_round(inst, name: str) -> float:
    start = time.perf_counter()
    subprocess.run(["ovs-vsctl", f"--db={inst.remote}", "--no-wait", "add-port", BRIDGE, name, "tag=10"],
                   check=True, capture_output=True)
    subprocess.run(["ovs-vsctl", f"--db={inst.remote}", "--no-wait", "del-port", BRIDGE, name],
                   check=True, capture_output=True)
    return (time.perf_counter() - start) / 2


def idl_round(db: Ovsdb, vmid: int) -> float:
    add = AddVhostPort(f"vhu{vmid}i9", BRIDGE, vmid, "net9", f"/tmp/none/vm-{vmid}-9.sock", PortVlan("access", 10))
    start = time.perf_counter()
    db.transact(lambda view: write(view, add), "bench add", wait_vswitchd=False)
    db.transact(lambda view: write(view, DelPort(add.port, BRIDGE)), "bench del", wait_vswitchd=False)
    return (time.perf_counter() - start) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", default="100,500,1000", help="bridge sizes to measure")
    sizes = [int(n) for n in parser.parse_args().ports.split(",")]
    inst = start_ovs("bench", dummy=True)
    try:
        inst.vsctl("add-br", BRIDGE, "--", "set", "Bridge", BRIDGE, "datapath_type=netdev")
        print(f"{'ports':>6} {'ovs-vsctl ms/change':>20} {'IDL ms/change':>14} {'IDL connect+snapshot ms':>24}")
        have = 0
        with Ovsdb(inst.remote, timeout=120) as db:
            for size in sizes:
                filler = [AddVhostPort(f"vhu{v}i0", BRIDGE, v, "net0", f"/tmp/none/vm-{v}-0.sock", PortVlan("access", 10))
                          for v in range(100000 + have, 100000 + size)]
                if filler:
                    db.apply(filler)
                have = size
                vsctl = median_ms([vsctl_round(inst, f"bench{i}") for i in range(ROUNDS)])
                idl = median_ms([idl_round(db, 900000 + i) for i in range(ROUNDS)])
                cold = []
                for _ in range(5):
                    start = time.perf_counter()
                    with Ovsdb(inst.remote, timeout=60) as fresh:
                        fresh.snapshot()
                    cold.append(time.perf_counter() - start)
                print(f"{size:>6} {vsctl:>20.1f} {idl:>14.1f} {median_ms(cold):>24.1f}")
    finally:
        inst.stop()


if __name__ == "__main__":
    main()
