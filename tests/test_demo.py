"""`./demo` as a fresh Debian 12 machine runs it: no test package importable, nothing left behind.

A fresh machine has none of the test packages (python3-pytest, python3-hypothesis and what
pytest pulls in). The demo runs here in a private mount namespace where each of them is
covered by a stand-in that raises ModuleNotFoundError on import, exactly as a missing
package does, for every process of the demo, isolated ones (`python3 -I`, the hookscript)
included: a path layout, not an environment variable a process could drop. Nothing is
uninstalled, so the other test runs on this machine are not affected.

Afterwards no process started by the demo may still run (each carries a unique
environment value), and no network namespace, temp folder, DPDK run folder or Open
vSwitch instance of the demo may be left.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO
from fixtures.mountns import private_mounts

pytestmark = pytest.mark.slow

DIST = Path("/usr/lib/python3/dist-packages")
# The test-only packages and the packages only pytest needs: absent on a fresh machine.
HIDDEN = ("pytest", "_pytest", "hypothesis", "pluggy", "iniconfig", "py")
MISSING = 'raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)\n'
# What the demo makes, by name (testbed/ovs.py: h3-demo-*; demo: pve-vhost-agent-demo*;
# testbed/guest.py while it builds the image: h7gu-guest-*; DPDK: h3demo*).
TMP_PATTERN = re.compile(r"^(pve-vhost-agent-demo|h3-demo-|h7gu-guest-)")
NETNS_PATTERN = re.compile(r"^h3-demo-")
DPDK_RUN = Path("/var/run/dpdk")


@pytest.fixture
def no_test_packages():
    """The mounts that hide the test packages (for private_mounts), and their folder."""
    folder = Path(tempfile.mkdtemp(prefix="h13d-hide-", dir="/tmp"))
    mounts = []
    for name in HIDDEN:
        if (DIST / name).is_dir():
            stand_in = folder / name
            stand_in.mkdir()
            (stand_in / "__init__.py").write_text(MISSING)
            mounts.append(["--bind", str(stand_in), str(DIST / name)])
        if (DIST / f"{name}.py").is_file():
            stand_in = folder / f"{name}.py"
            stand_in.write_text(MISSING)
            mounts.append(["--bind", str(stand_in), str(DIST / f"{name}.py")])
    assert any(m[-1] == str(DIST / "pytest") for m in mounts), "python3-pytest is not where Debian puts it"
    yield mounts
    shutil.rmtree(folder, ignore_errors=True)


def test_the_hidden_packages_cannot_be_imported_even_by_an_isolated_python(no_test_packages):
    for module in ("pytest", "_pytest", "hypothesis", "py"):
        result = subprocess.run(private_mounts(no_test_packages, ["/usr/bin/python3", "-I", "-c", f"import {module}"]),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and f"ModuleNotFoundError: No module named '{module}'" in result.stderr, \
            (module, result.stderr)
    # The agent itself imports fine there.
    result = subprocess.run(private_mounts(no_test_packages, ["/usr/bin/python3", "-I", "-c",
                                                              "import ovs.db.idl, pyroute2, click, systemd.journal"]),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_demo_runs_without_test_packages_and_shows_guest_traffic_with_its_tags(no_test_packages):
    mark = f"h13d-{uuid.uuid4().hex}"
    before = _footprint()
    env = {**os.environ, "PVE_VHOST_AGENT_DEMO_RUN": mark, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    began = time.monotonic()
    result = subprocess.run(private_mounts(no_test_packages, [str(REPO / "demo")]), env=env, cwd="/",
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - began
    out = result.stdout
    print(f"\n./demo took {took:.0f} s")
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "ModuleNotFoundError" not in out + result.stderr
    # The guest's frames left OVS-DPDK with S-tag 950 (802.1ad) around its C-tag 10, and it got answers.
    assert "frames from the guest on the wire: 88a8/950 8100/10" in out, out[-4000:]
    assert re.search(r"guest console: pve-vhost-agent-guest: reply from 192\.0\.2\.1", out), out[-4000:]
    assert re.search(r"vhu100i1 net1 on br-vhost: vhost-user client connected", out), out[-4000:]
    # Two VMs joined by a link: each guest heard the other's LLDP frames, none of its own
    # came back, nothing else arrived; the first one started alone (a dark link).
    assert "102:net0: port 20001, MAC" in out and ", stopped (dark)" in out, out[-4000:]
    heard = {int(m["vm"]): m for m in re.finditer(
        r"^LLDP over the link: VM (?P<vm>\d+) heard (?P<n>\d+) frames from VM (?P<peer>\d+) \((?P<mac>[0-9a-f:]+)\), "
        r"(?P<own>\d+) of its own, (?P<other>\d+) from anyone else$", out, re.M)}
    assert set(heard) == {101, 102}, out[-4000:]
    for vm, peer in ((101, 102), (102, 101)):
        assert int(heard[vm]["peer"]) == peer and int(heard[vm]["n"]) > 0, heard[vm][0]
        assert heard[vm]["own"] == "0" and heard[vm]["other"] == "0", heard[vm][0]
    assert heard[101]["mac"] != heard[102]["mac"]
    assert "2 link ends (2 connected)" in out, out[-4000:]

    # Nothing of it is left: processes, namespaces, temp folders, DPDK run folders, OVS.
    assert _processes_with(mark) == []
    after = _footprint()
    assert {kind: after[kind] - before[kind] for kind in after} == {kind: set() for kind in after}


def _processes_with(mark: str) -> list[str]:
    """Live processes whose environment carries `mark` (every process the demo started)."""
    found = []
    needle = f"PVE_VHOST_AGENT_DEMO_RUN={mark}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:200]
                    found.append(f"{proc.name}: {argv!r}")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return found


def _footprint() -> dict[str, set[str]]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    return {
        "netns": {line.split()[0] for line in netns.splitlines() if line and NETNS_PATTERN.match(line)},
        "tmp": {p.name for p in Path("/tmp").iterdir() if TMP_PATTERN.match(p.name)},
        "dpdk": {p.name for p in DPDK_RUN.iterdir() if p.name.startswith("h3demo")} if DPDK_RUN.is_dir() else set(),
    }
