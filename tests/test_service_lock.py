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
        if committed is None and not worker.is_alive() and inst.find("Port", "name=vhu100i0") == []:
            # A loaded machine: the whole pass (it does not wait for ovs-vswitchd) ended within
            # one `ovs-vsctl find` of the loop above; the lock must be free now all the same.
            committed = time.monotonic()
            with open(lock, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while anything holds it
                free = time.monotonic()
    assert committed is not None and free is not None
    assert free - committed < 1.0  # not after a 3 s wait
    assert [str(p) for p in reports[0].failures] == []  # the row is gone; vswitchd is the doctor's


def test_a_bug_in_one_vms_change_is_that_vms_one_line_problem(fresh_ovs, pve_root, monkeypatch):
    """Fault injection: applying VM 100's change raises something the agent never expects;
    VM 101's leftover still goes, and VM 100's failure is one line saying it is a bug."""
    import pve_vhost_agent.flows.service as service_flow
    inst = fresh_ovs("h11bug")
    with Ovsdb(inst.remote, timeout=10) as db:  # leftovers of two VMs that do not run here
        db.apply([EnsureBridge("h11bugb", "netdev"),
                  AddVhostPort("vhu100i0", "h11bugb", 100, "net0", "/tmp/h11bug-none/vm-100-0.sock", PortVlan()),
                  AddVhostPort("vhu101i0", "h11bugb", 101, "net0", "/tmp/h11bug-none/vm-101-0.sock", PortVlan())])
    real = service_flow.apply_plan

    def buggy(settings, actions, *args, **kwargs):
        if any(getattr(a, "vmid", None) == 100 for a in actions):
            raise KeyError("injected")
        return real(settings, actions, *args, **kwargs)

    monkeypatch.setattr(service_flow, "apply_plan", buggy)
    with Service(pve_root.settings(ovsdb=inst.remote, ovs_timeout=10)) as service:
        report = service.run_pass()
    assert inst.find("Port", "name=vhu101i0") == []
    assert len(inst.find("Port", "name=vhu100i0")) == 1
    failures = [(p.vmid, str(p)) for p in report.failures]
    assert len(failures) == 1 and failures[0][0] == 100
    assert "unexpected KeyError" in failures[0][1] and "bug in pve-vhost-agent" in failures[0][1]
    assert "\n" not in failures[0][1] and "Traceback" not in failures[0][1]
