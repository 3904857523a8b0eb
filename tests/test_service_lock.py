"""The service holds Proxmox's VM lock only to re-check the VM and commit, never while
ovs-vswitchd catches up (`qm start` and `qm migrate` wait only 10 s for that lock): it does
not wait for ovs-vswitchd at all, a later pass sees what it made."""

import fcntl
import threading
import time

from pve_vhost_agent.model.actions import AddVhostPort, EnsureBridge
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.model.ovs import PortVlan
from pve_vhost_agent.flows.service import Service


def test_the_vm_lock_is_free_while_the_service_waits_for_ovs_vswitchd(fresh_ovs, pve_root):
    inst = fresh_ovs("h11oflk")
    with Ovsdb(inst.remote, timeout=10) as db:  # what a pre-start left for VM 100, which does not run
        db.apply([EnsureBridge("h11oflb", "netdev"),
                  AddVhostPort("vhu100i0", "h11oflb", 100, "net0", "/tmp/h11of-none/vm-100-0.sock", PortVlan())])
    inst.appctl("exit")  # ovsdb-server stays; nothing applies the service's change any more
    settings = pve_root.settings(ovsdb=inst.remote, ovs_timeout=3)
    lock = settings.vm_lock(100)
    lock.parent.mkdir(parents=True, exist_ok=True)
    reports = []
    with Service(settings) as service:
        worker = threading.Thread(target=lambda: reports.append(service.run_pass()))
        worker.start()
        committed = free = None
        with open(lock, "a") as handle:
            while worker.is_alive() and free is None:
                if committed is None and inst.find("Port", "name=vhu100i0") == []:
                    committed = time.monotonic()  # ovs-vswitchd would need its ovs_timeout (3 s) now
                if committed is not None:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `qm start` would take it
                        free = time.monotonic()
                        fcntl.flock(handle, fcntl.LOCK_UN)
                    except BlockingIOError:
                        pass
                time.sleep(0.02)
        worker.join(30)
    assert committed is not None and free is not None
    assert free - committed < 1.0  # not after a 3 s wait
    assert [str(p) for p in reports[0].failures] == []  # the row is gone; vswitchd is the doctor's
