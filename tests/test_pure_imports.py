"""The planners and parsers stay pure: importing them loads no I/O library (checked in a
clean interpreter, so other tests' imports cannot hide a leak)."""

import json
import subprocess
import sys
from pathlib import Path

from pve_vhost_agent.spec import VhostNic, socket_name, socket_vmid

PLANNERS = ("argsplan", "ovsplan", "reconcile", "argsync", "capacity", "specfile", "vmconfig")
FORBIDDEN = ("subprocess", "fcntl", "ovs", "pyroute2", "systemd")
CHECKOUT = Path(__file__).resolve().parent.parent


def test_planners_import_no_io_library():
    code = (
        f"import json, sys; sys.path.insert(0, {str(CHECKOUT)!r})\n"
        f"for name in {PLANNERS!r}:\n"
        "    __import__('pve_vhost_agent.' + name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert json.loads(out) == []


def test_socket_names_are_parsed_by_what_makes_them():
    assert VhostNic(100, 31, "vhostbr0", "02:00:00:00:00:01").socket_name == socket_name(100, 31) == "vm-100-31.sock"
    assert socket_vmid("vm-100-31.sock") == 100
    for other in ("vm-100-32.sock", "vm-100-01.sock", "vm-100-x.sock", "vm-100-1.sock.tmp", "other.sock"):
        assert socket_vmid(other) is None
