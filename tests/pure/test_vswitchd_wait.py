"""When a start stops waiting for ovs-vswitchd (model/vswitchd): at once when it is dead,
after one window when it is stuck, never while it works, up to the limit."""

import pytest

from pve_vhost_agent.model.vswitchd import Activity, verdict

PIDFILE = "/run/openvswitch/ovs-vswitchd.pid"
A = Activity(4242, 1000)


@pytest.mark.parametrize("before, now, waited, expected", [
    (A, Activity(4242, 1900), 30, None),  # reconfiguring thousands of ports: wait on
    (A, Activity(4242, 1000), 30, "ovs-vswitchd (pid 4242) used no CPU meanwhile: it looks stuck"),
    (A, None, 30, f"ovs-vswitchd is not running (no live process in {PIDFILE})"),
    (None, None, 30, f"ovs-vswitchd is not running (no live process in {PIDFILE})"),
    (None, Activity(77, 3), 30, None),  # it started meanwhile: it applies the whole database first
    (A, Activity(77, 3), 30, None),  # restarted (systemctl restart openvswitch-switch)
    (A, Activity(4242, 9000), 300, "ovs-vswitchd (pid 4242) kept working but a start waits at most 300 s "
                                   "(ovs_busy_timeout)"),
])
def test_the_wait_goes_on_only_while_ovs_vswitchd_works(before, now, waited, expected):
    assert verdict(before, now, waited, 300, PIDFILE) == expected
