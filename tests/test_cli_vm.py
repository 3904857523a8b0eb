"""`show` and `apply`: the planned args line, written once, kept in step with the VM."""

import difflib
import json

import pytest

from fixtures.fakeqemu import start_fake_qemu

from pve_vhost_agent.formats.vmconfig import VmConfig

ROUTER = """\
#TNSR router
boot: order=scsi0
cores: 2
memory: 4096
balloon: 0
name: router
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0
args: -smbios 'type=1,serial=a b'
ostype: l26
"""


HOOK = "hookscript: local:snippets/pve-vhost-agent\n"


@pytest.fixture
def router(pve_root):
    """VM 100 with a declared NIC and the agent's hookscript, its args not written yet (the
    hookscript set by `qm set` after the declaration: `apply` refuses VMs without it)."""
    pve_root.write_vm(100, ROUTER)
    assert pve_root.cli("nic", "add", "100", "net1", "--bridge", "br-vhost", "--qinq", "950").returncode == 0
    pve_root.write_vm(100, ROUTER + HOOK)
    return pve_root


def config_of(root, vmid=100) -> VmConfig:
    return VmConfig.parse(root.vm_path(vmid).read_text())


def show_json(root, vmid=100) -> dict:
    result = root.cli("show", str(vmid), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_show_json_lists_the_agent_args_as_proxmox_splits_them(router):
    shown = show_json(router)
    sock = str(router.root / "run/pve-vhost-agent/ovs/vm-100-1.sock")
    assert shown["args"][:4] == ["-object", "memory-backend-memfd,id=vhu-mem,size=4096M,share=on",
                                 "-machine", "memory-backend=vhu-mem"]
    assert f"socket,id=vhu-net1,path={sock},server=on,wait=off" in shown["args"]
    assert shown["in_sync"] is False and shown["current"] == []
    assert shown["running"] is False and shown["node"] == router.node


def test_apply_writes_once_keeps_user_args_and_every_other_byte(router):
    before = router.vm_path(100).read_text()
    first = router.cli("apply", "100")
    assert first.returncode == 0, first.stderr
    assert "args written to the VM config" in first.stdout
    after = router.vm_path(100).read_text()
    diff = [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"]
    # The args line changed; the GUI marks (plan/marks) came in; every other line is as it was.
    assert [line for line in diff if line[0] == "-"] == ["- args: -smbios 'type=1,serial=a b'"]
    added = [line[2:] for line in diff if line[0] == "+"]
    assert len(added) == 3 and added[0].startswith("#pve-vhost-agent%3A vhost-user NICs net1 (br-vhost)")
    assert added[1].startswith("args: -smbios 'type=1,serial=a b' -object memory-backend-memfd")
    assert added[2] == "tags: vhost-user" and after.startswith("#TNSR router\n#pve-vhost-agent%3A")
    assert show_json(router)["in_sync"] is True
    again = router.cli("apply", "100")
    assert again.returncode == 0 and "args up to date" in again.stdout
    assert router.vm_path(100).read_text() == after


def test_memory_change_is_explained_and_fixed_by_apply(router):
    router.cli("apply", "100")
    text = router.vm_path(100).read_text().replace("memory: 4096", "memory: 8192")
    router.vm_path(100).write_text(text)
    shown = router.cli("show", "100")
    assert "memory changed from 4096 to 8192 MiB since the args were written" in shown.stdout
    assert "fix: pve-vhost-agent apply 100" in shown.stdout
    assert router.cli("apply", "100").returncode == 0
    assert "size=8192M" in config_of(router).section("main")["args"]


def test_pending_memory_is_what_the_next_start_uses(router):
    router.vm_path(100).write_text(ROUTER + HOOK + "\n[PENDING]\nmemory: 2048\n")
    router.cli("apply", "100")
    assert "size=2048M" in config_of(router).section("main")["args"]


def test_running_vm_gets_a_pending_change(router, tmp_path):
    sleeper = start_fake_qemu(router.root / "var/run/qemu-server/100.pid")
    try:
        result = router.cli("apply", "100")
        assert result.returncode == 0, result.stderr
        assert "as a pending change" in result.stdout and "next start" in result.stdout
        config = config_of(router)
        assert config.section("main")["args"] == "-smbios 'type=1,serial=a b'"
        assert "vhu-net1" in config.section("pending")["args"]
        assert router.cli("apply", "100").stdout.strip() == "VM 100: args up to date"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_removing_the_spec_removes_only_the_agent_args(router):
    router.cli("apply", "100")
    result = router.cli("nic", "remove", "100", "net1")  # an enabled VM's args follow at once
    assert result.returncode == 0, result.stderr
    assert "net1 is in the args but no longer declared" in result.stdout
    assert router.cli("apply", "--all").stdout == "apply: 0 VMs: 0 written, 0 up to date, 0 failed\n"
    assert router.vm_path(100).read_text() == ROUTER + HOOK


def test_apply_dry_run_writes_nothing(router):
    before = router.snapshot()
    result = router.cli("apply", "100", "--dry-run")
    assert result.returncode == 0 and "dry run: would write args" in result.stdout
    assert router.snapshot() == before


@pytest.mark.parametrize(
    "edit, words, code",
    [
        (("balloon: 0\n", ""), "balloon", 8),
        (("memory: 4096\n", "memory: 4096\nhotplug: disk,network,memory\n"), "hotplug", 8),
        (("memory: 4096\n", "memory: 4096\nnuma: 1\n"), "numa", 8),
        (("args: -smbios 'type=1,serial=a b'\n", "args: -numa node,nodeid=0\n"), "-numa", 4),
    ],
)
def test_unsafe_layouts_are_refused_with_one_line_and_nothing_written(router, edit, words, code):
    router.vm_path(100).write_text(ROUTER.replace(*edit))
    before = router.snapshot()
    for command in (("show", "100", "--json"), ("apply", "100")):
        result = router.cli(*command)
        assert result.returncode == code, result
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1 and words in result.stderr
    assert router.snapshot() == before


def test_unknown_vm_and_remote_vm(router):
    result = router.cli("apply", "999")
    assert result.returncode == 5 and "VM 999 does not exist" in result.stderr
    router.write_vm(200, ROUTER, node="other")
    router.cli("nic", "add", "200", "net1", "--bridge", "br-vhost")
    before = router.snapshot()
    result = router.cli("apply", "200")
    assert result.returncode == 4 and "lives on node other" in result.stderr
    assert router.snapshot() == before
    # --all takes only this node's VMs.
    assert "200" not in router.cli("apply", "--all").stdout


def test_apply_all_reports_each_vm_and_fails_if_one_fails(router):
    router.write_vm(101, ROUTER.replace("balloon: 0\n", ""))
    router.cli("nic", "add", "101", "net2", "--bridge", "br-vhost")
    result = router.cli("apply", "--all")
    assert result.returncode == 8
    assert "VM 100: args written" in result.stdout
    assert result.stderr.startswith("VM 101: ") and "balloon" in result.stderr


def test_apply_all_reports_an_unreadable_config_and_goes_on(router):
    router.cli("apply", "100")
    broken = router.vm_path(102)
    broken.mkdir()  # a folder where a config file should be: reading it fails
    result = router.cli("apply", "--all")
    assert result.returncode != 0
    assert "VM 100: args up to date" in result.stdout
    assert result.stderr.startswith("VM 102: cannot read")
