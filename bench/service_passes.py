"""What the running service pays per pass when nothing changed: one Service (the object
`pve-vhost-agent service` runs) makes its first pass, then `runs` more, each timed (wall
and this process's CPU). Run by bench/run with a node's environment; prints one JSON
object on stdout."""

from __future__ import annotations

import json
import os
import sys
import time

from pve_vhost_agent.flows.service import Service
from pve_vhost_agent.settings import Settings


def main() -> None:
    runs = int(sys.argv[1])
    settings = Settings.checked(os.environ["PVE_VHOST_AGENT_ROOT"], os.environ["PVE_VHOST_AGENT_OVSDB"],
                                os.environ["PVE_VHOST_AGENT_NODE"])
    walls, cpus, actions = [], [], []
    with Service(settings) as service:
        first = service.run_pass()
        for _ in range(runs):
            wall, cpu = time.perf_counter(), time.process_time()
            report = service.run_pass()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            actions.append(len(report.plan.actions))
    print(json.dumps({"walls": walls, "cpus": cpus, "actions": actions, "first_problems": len(first.problems)}))


if __name__ == "__main__":
    main()
