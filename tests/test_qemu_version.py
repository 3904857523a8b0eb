"""The installed QEMU's version, read the way the agent reads it on a Proxmox host."""

import subprocess

import pytest

from fixtures.qemu import QEMU
from pve_vhost_agent.errors import AgentError
from pve_vhost_agent.adapters.qemu import installed_version, parse_version


@pytest.mark.parametrize("text, version", [
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022", (7, 2, 22)),
    ("QEMU emulator version 9.2.0 (pve-qemu-kvm_9.2.0-5)\n", (9, 2, 0)),
    ("QEMU emulator version 10.0.2 (pve-qemu-kvm_10.0.2-4)\n", (10, 0, 2)),
    ("QEMU emulator version 2.5 (Debian)\n", (2, 5, 0)),
])
def test_version_lines(text, version):
    assert parse_version(text) == version


def test_installed_version_matches_the_debian_package():
    package = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "qemu-system-x86"],
                             capture_output=True, text=True, check=True).stdout
    upstream = package.split(":", 1)[-1].split("+", 1)[0]  # 1:7.2+dfsg-7... -> 7.2
    major, minor = (int(x) for x in upstream.split(".")[:2])
    assert installed_version(QEMU)[:2] == (major, minor)
    # Without a path: /usr/bin/kvm when it exists (Proxmox), else qemu-system-x86_64.
    assert installed_version() == installed_version(QEMU)


@pytest.mark.parametrize("binary, message", [
    ("/nonexistent/kvm", "QEMU binary /nonexistent/kvm does not exist"),
    ("/bin/true", "cannot read a QEMU version from 'true (GNU coreutils)"),
    ("/bin/false", "/bin/false --version failed with exit code 1"),
    ("/etc/hostname", "QEMU binary /etc/hostname cannot be run"),
])
def test_a_missing_or_wrong_binary_is_a_clear_error(binary, message):
    with pytest.raises(AgentError) as err:
        installed_version(binary)
    assert message in str(err.value) and "\n" not in str(err.value)
