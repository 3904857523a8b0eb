"""The hookscript's front door: silent for VMs that are not the agent's, one line for bad calls."""

import os
import shutil
import socket
import subprocess

import pytest

from fixtures.fakeqemu import start_fake_qemu
from conftest import REPO

HOOKSCRIPT = REPO / "hookscripts" / "pve-vhost-agent"
VM = "balloon: 0\nmemory: 512\nname: r\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n"


def call_hook(root, *argv: str, **env) -> subprocess.CompletedProcess:
    """As pve-guest-common runs it: argv only, LC_ALL=C, an empty stdin pipe, no shell."""
    environment = {**os.environ, "LC_ALL": "C", "PYTHONPATH": str(REPO),
                   "PVE_VHOST_AGENT_ROOT": str(root.root), "PVE_VHOST_AGENT_NODE": root.node, **env}
    return subprocess.run([str(HOOKSCRIPT), *argv], input=b"", capture_output=True, env=environment, timeout=60)


def test_the_hookscript_is_an_executable_python_script():
    assert os.access(HOOKSCRIPT, os.X_OK)
    assert HOOKSCRIPT.read_text().startswith("#!/usr/bin/python3 -IS\n")  # isolated, no site: no PYTHONPATH, script dir, /usr/local


@pytest.mark.parametrize("phase", ["pre-start", "post-start", "pre-stop", "post-stop"])
def test_a_vm_without_spec_gets_exit_0_and_no_output(pve_root, phase):
    pve_root.write_vm(100, VM)
    result = call_hook(pve_root, "100", phase, PVE_MIGRATED_FROM="")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


@pytest.mark.parametrize("phase", ["pre-start", "post-start", "pre-stop", "post-stop"])
def test_a_vm_with_only_the_agents_hookscript_is_silent_too(pve_root, phase):
    pve_root.write_vm(100, VM + "hookscript: local:snippets/pve-vhost-agent\n")
    result = call_hook(pve_root, "100", phase, PVE_MIGRATED_FROM="",
                       PVE_VHOST_AGENT_OVSDB=f"unix:{pve_root.root}/no-ovsdb.sock")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


@pytest.mark.parametrize(
    "argv, words",
    [
        (("100", "pre-boot"), b"unknown hook phase 'pre-boot'; use one of: pre-start, post-start, pre-stop, post-stop"),
        (("abc", "pre-start"), b"VM id 'abc' is not a positive integer"),
        (("0", "pre-start"), b"VM id '0' is not a positive integer"),
    ],
)
def test_bad_calls_get_one_line_and_exit_2(pve_root, argv, words):
    result = call_hook(pve_root, *argv)
    assert result.returncode == 2 and result.stdout == b""
    assert len(result.stderr.splitlines()) == 1 and words in result.stderr


def test_a_spec_whose_vm_config_is_gone_aborts_pre_start(pve_root):
    pve_root.write_vm(100, VM)
    assert pve_root.cli("nic", "add", "100", "net1", "--bridge", "brv").returncode == 0
    pve_root.vm_path(100).unlink()
    result = call_hook(pve_root, "100", "pre-start", PVE_MIGRATED_FROM="")
    assert result.returncode == 5
    assert b"VM 100 has a spec but no config" in result.stdout


def test_a_malformed_spec_file_aborts_pre_start_with_the_line(pve_root):
    pve_root.write_vm(100, VM)
    pve_root.spec_file(100).parent.mkdir(parents=True)
    pve_root.spec_file(100).write_text("vhostuser: 100-net1\n\tbridge brv\n\tmac 02:00:00:00:00:01\n\ttag 5000\n")
    result = call_hook(pve_root, "100", "pre-start", PVE_MIGRATED_FROM="")
    assert result.returncode == 3
    assert b"pve-vhost-agent/100.cfg line 1 (vhostuser: 100-net1): VLAN tag 5000 is outside 1-4094" in result.stderr


def test_install_hook_puts_an_executable_copy_into_the_storage(pve_root):
    (pve_root.root / "etc/pve/storage.cfg").write_text(
        "dir: local\n\tpath /var/lib/vz\n\tcontent snippets\n\ndir: shared\n\tpath /mnt/shared\n\tcontent snippets\n")
    first = pve_root.cli("install-hook", "--storage", "shared")
    target = pve_root.root / "mnt/shared/snippets/pve-vhost-agent"
    assert first.returncode == 0 and f"installed at {target}" in first.stdout
    assert target.read_bytes() == HOOKSCRIPT.read_bytes() and os.access(target, os.X_OK)
    assert "already up to date" in pve_root.cli("install-hook", "--storage", "shared").stdout
    missing = pve_root.cli("install-hook", "--storage", "nosuch")
    assert missing.returncode == 5 and "storage 'nosuch' is not in" in missing.stderr


def test_enable_refuses_an_unsafe_vm_and_writes_nothing(pve_root):
    pve_root.write_vm(100, VM.replace("balloon: 0\n", ""))
    pve_root.cli("nic", "add", "100", "net1", "--bridge", "brv")
    before = pve_root.snapshot()
    result = pve_root.cli("enable", "100")
    assert result.returncode == 8 and "balloon" in result.stderr
    assert pve_root.snapshot() == before


def test_disable_refuses_a_running_vm_with_vhost_nics(pve_root):
    pve_root.write_vm(100, VM)
    pve_root.cli("nic", "add", "100", "net1", "--bridge", "brv")
    assert pve_root.cli("enable", "100").returncode == 0
    sleeper = start_fake_qemu(pve_root.root / "var/run/qemu-server/100.pid")
    try:
        result = pve_root.cli("disable", "100")
        assert result.returncode == 4 and "stop the VM first" in result.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def old_hook(root, name: str = "old.pl", text: str = "#!/usr/bin/perl\nexit 0;\n", mode: int = 0o755):
    """A VM's own hookscript in the local storage's snippets/ folder."""
    path = root.root / "var/lib/vz/snippets" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_enable_disable_and_install_hook_dry_runs_write_nothing(pve_root):
    old_hook(pve_root)
    pve_root.write_vm(100, VM + "hookscript: local:snippets/old.pl\n")
    pve_root.cli("nic", "add", "100", "net1", "--bridge", "brv")
    before = pve_root.snapshot()
    result = pve_root.cli("enable", "100", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would install the hookscript at" in result.stdout and "set hookscript: local:snippets/pve-vhost-agent" in result.stdout
    assert "would run its hookscript local:snippets/old.pl after the agent's" in result.stdout
    assert "would write args: -object memory-backend-memfd" in result.stdout
    assert "dry run: would install it at" in pve_root.cli("install-hook", "--dry-run").stdout
    assert pve_root.snapshot() == before
    assert pve_root.cli("enable", "100").returncode == 0
    enabled = pve_root.snapshot()
    result = pve_root.cli("disable", "100", "--dry-run")
    assert "would write hookscript: local:snippets/old.pl and args: (none)" in result.stdout
    assert pve_root.snapshot() == enabled


def test_a_socket_folder_that_cannot_be_made_aborts_pre_start_in_one_line(pve_root):
    pve_root.write_vm(100, VM)
    pve_root.cli("nic", "add", "100", "net1", "--bridge", "brv")
    assert pve_root.cli("enable", "100").returncode == 0
    shutil.rmtree(pve_root.root / "run/pve-vhost-agent")  # made by enable: someone put a file there since
    (pve_root.root / "run/pve-vhost-agent").write_text("not a folder\n")
    result = call_hook(pve_root, "100", "pre-start", PVE_MIGRATED_FROM="")
    assert result.returncode == 4 and b"Traceback" not in result.stdout + result.stderr
    assert b"refusing the socket folder" in result.stdout and b"pve-vhost-agent is not a plain folder" in result.stdout


UNRUNNABLE = [
    # (what, text, mode, words)
    ("missing", None, 0o755, "is missing"),
    ("not executable", "#!/bin/sh\n", 0o644, "is not executable, so Proxmox could not run it"),
    ("without a #! line", "echo no shebang\n", 0o755, "has no `#!` line, so Proxmox could not run it"),
]


@pytest.mark.parametrize("text, mode, words", [u[1:] for u in UNRUNNABLE], ids=[u[0] for u in UNRUNNABLE])
def test_enable_refuses_to_chain_a_hookscript_proxmox_could_not_run(pve_root, text, mode, words):
    # `enable` recorded it, and so did `disable && enable` after it went missing.
    if text is not None:
        old_hook(pve_root, "old.sh", text, mode)
    pve_root.write_vm(100, VM + "hookscript: local:snippets/old.sh\n")
    before = pve_root.snapshot()
    result = pve_root.cli("enable", "100")
    assert result.returncode in (4, 5) and result.stderr.count("\n") == 1
    assert "VM 100's hookscript local:snippets/old.sh" in result.stderr and words in result.stderr
    assert "qm set 100 --delete hookscript" in result.stderr
    assert pve_root.snapshot() == before  # not even the hookscript installed


@pytest.mark.parametrize("text, mode, words", [u[1:] for u in UNRUNNABLE], ids=[u[0] for u in UNRUNNABLE])
def test_a_chained_hookscript_that_went_bad_since_fails_in_one_line(pve_root, text, mode, words):
    old = old_hook(pve_root, "old.sh", "#!/bin/sh\n")
    pve_root.write_vm(100, VM + "hookscript: local:snippets/old.sh\n")
    assert pve_root.cli("enable", "100").returncode == 0
    old.unlink()
    if text is not None:
        old_hook(pve_root, "old.sh", text, mode)
    result = call_hook(pve_root, "100", "pre-start", PVE_MIGRATED_FROM="")
    assert result.returncode in (4, 5) and b"Traceback" not in result.stderr
    assert b"chained hookscript local:snippets/old.sh" in result.stderr and words.encode() in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_stale_socket_that_cannot_be_removed_is_a_one_line_warning_at_post_stop(pve_root, ovs):
    pve_root.write_vm(100, VM)
    pve_root.cli("nic", "add", "100", "net1", "--bridge", "brv")
    folder = pve_root.root / "run/pve-vhost-agent/ovs"
    folder.mkdir(parents=True)
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(folder / "vm-100-1.sock"))  # what a QEMU that is gone left behind
    left.close()
    subprocess.run(["chattr", "+i", str(folder)], check=True)  # unlink fails even for root
    try:
        result = call_hook(pve_root, "100", "post-stop", PVE_VHOST_AGENT_OVSDB=ovs.remote)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert result.returncode == 0 and b"Traceback" not in result.stderr
    assert b"cannot remove the stale socket" in result.stdout and b"Operation not permitted" in result.stdout
