"""The CLI's front door: version, help, and one-line errors with their exit codes."""

import subprocess
import sys

from pve_vhost_agent import __version__

from conftest import REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/usr/bin/python3", "-m", "pve_vhost_agent", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


def test_version_from_checkout():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pve-vhost-agent, version {__version__}"


def test_tests_run_under_debian_python():
    # Debian's python3-* packages are importable only from /usr/bin/python3.
    assert sys.executable.startswith("/usr/bin/python3")
    import ovs.db.idl  # noqa: F401
    import pyroute2  # noqa: F401
