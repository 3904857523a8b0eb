"""What an operator meets when something around the agent is wrong (issue 13, item 2).

- /etc/pve not mounted (pve-cluster down: the bare mount point, an empty folder): every
  command that reads it exits 10 with one line naming `systemctl status pve-cluster`,
  writes nothing there, and the service reports it instead of "0 VMs ... ok".
  Modelled as pmxcfs shows it: a folder without the `.version` file pmxcfs always serves.
- /etc/pve read-only (no quorum; pmxcfs shows its folders 0555): reported, nothing written.
- A VM with the agent's vhost-user args but not its hookscript would start with a dead
  NIC: `apply` refuses without --force, `show` and `status` flag it, `enable --all` fixes it.
- An Open vSwitch outage is one problem while it lasts, whatever its words.
- A Proxmox NIC added on an index the agent holds is a problem the service logs once.
"""

from __future__ import annotations

import json
import logging

import pytest

from pve_vhost_agent.errors import ExitCode
from pve_vhost_agent.flows.service import Service

VM = "balloon: 0\nmemory: 2048\nname: router\nostype: l26\n"
HOOK = "hookscript: local:snippets/pve-vhost-agent\n"
FIX = "systemctl status pve-cluster"


@pytest.fixture
def node_ovs(fresh_ovs):
    """A switch of this test's own: the service removes owned ports of VMs that do not run."""
    return fresh_ovs("h13op")


def one_line(result) -> str:
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def unmount(pve_root) -> None:
    """pve-cluster stops: /etc/pve is the bare mount point (no files pmxcfs serves)."""
    (pve_root.root / "etc/pve/.version").unlink()
    (pve_root.root / "etc/pve/.members").unlink()


def test_without_pmxcfs_commands_exit_10_with_one_line_and_write_nothing(pve_root):
    pve_root.write_vm(100, VM)
    assert pve_root.cli("nic", "add", "100", "net1", "--bridge", "br-vhost").returncode == 0
    # pmxcfs stops: the folder it served is empty.
    for path in sorted((pve_root.root / "etc/pve").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    before = pve_root.snapshot()
    for args in (["nic", "list"], ["nic", "list", "100"], ["show", "100"], ["apply", "100"], ["apply", "--all"],
                 ["enable", "--all"], ["nic", "add", "100", "net2", "--bridge", "br-vhost"],
                 ["nic", "remove", "100", "net1"], ["qinq", "set", "100", "net0", "--qinq", "10"]):
        result = pve_root.cli(*args)
        assert result.returncode == ExitCode.CLUSTER_DOWN, (args, result.stdout, result.stderr)
        line = one_line(result)
        assert "etc/pve is not mounted" in line and FIX in line, line
        assert "no NICs declared" not in result.stdout and "does not exist" not in line
    assert pve_root.snapshot() == before  # no priv/lock, no spec folder made in the bare mount point


def test_without_pmxcfs_the_service_says_so_and_changes_nothing(pve_root, node_ovs):
    unmount(pve_root)
    status = pve_root.cli("--ovsdb", node_ovs.remote, "status")
    assert status.returncode == ExitCode.CLUSTER_DOWN, status.stderr
    assert status.stdout.startswith("VMs unknown (/etc/pve not mounted): 0 vhost-user ports")
    assert "1 problem, first: " in status.stdout and FIX in status.stdout and " ok;" not in status.stdout
    shown = json.loads(pve_root.cli("--ovsdb", node_ovs.remote, "status", "--json").stdout)
    assert (shown["cluster_fs"], shown["vms"], shown["pending"]) == ("not mounted", None, [])
    assert pve_root.cli("--ovsdb", node_ovs.remote, "service", "--once").returncode == ExitCode.CLUSTER_DOWN


def test_without_quorum_the_service_reports_read_only_and_writes_no_args(pve_root, node_ovs):
    pve_root.write_vm(100, VM + HOOK)
    assert pve_root.cli("nic", "add", "100", "net1", "--bridge", "br-vhost").returncode == 0
    before = pve_root.vm_path(100).read_text()  # no args yet: stale
    nodes = pve_root.root / "etc/pve/nodes"
    nodes.chmod(0o555)  # what pmxcfs shows without quorum
    try:
        result = pve_root.cli("--ovsdb", node_ovs.remote, "service", "--once")
        assert result.returncode == ExitCode.REFUSED, result.stdout + result.stderr
        assert "read-only: this node has no quorum" in result.stdout and "pvecm status" in result.stdout
        assert pve_root.vm_path(100).read_text() == before
    finally:
        nodes.chmod(0o755)
    assert pve_root.cli("--ovsdb", node_ovs.remote, "service", "--once").returncode == 0
    assert "args: " in pve_root.vm_path(100).read_text()


def test_apply_refuses_vhost_user_args_for_a_vm_without_the_agents_hookscript(pve_root, node_ovs):
    pve_root.write_vm(100, VM)
    assert pve_root.cli("nic", "add", "100", "net1", "--bridge", "br-vhost").returncode == 0
    before = pve_root.vm_path(100).read_text()
    refused = pve_root.cli("apply", "100")
    assert refused.returncode == ExitCode.CONFLICT
    assert "does not have the agent's hookscript" in one_line(refused) and "enable 100" in refused.stderr
    assert pve_root.vm_path(100).read_text() == before
    shown = pve_root.cli("show", "100")
    assert "not enabled: VM 100 does not have the agent's hookscript" in shown.stdout
    # --force writes them, and says what that means.
    forced = pve_root.cli("apply", "100", "--force")
    assert forced.returncode == 0 and "starts with dead NICs (net1)" in forced.stderr
    shown = json.loads(pve_root.cli("show", "100", "--json").stdout)
    assert (shown["in_sync"], shown["enabled"], shown["dead_nics"]) == (True, False, ["net1"])
    assert "it would start with a dead NIC" in pve_root.cli("show", "100").stdout
    status = pve_root.cli("--ovsdb", node_ovs.remote, "status")
    assert status.returncode == ExitCode.CONFLICT
    assert "VM 100 has the agent's vhost-user args but not its hookscript" in status.stdout
    assert "enable --all" in status.stdout
    # enable --all enables it (and only VMs with declarations).
    pve_root.write_vm(101, VM)
    enabled = pve_root.cli("enable", "--all")
    assert enabled.returncode == 0, enabled.stderr
    assert enabled.stdout.splitlines()[-1] == "enable: 1 VM: 1 enabled, 0 failed"
    assert HOOK in pve_root.vm_path(100).read_text() and HOOK not in pve_root.vm_path(101).read_text()
    assert pve_root.cli("--ovsdb", node_ovs.remote, "status").returncode == 0


def test_apply_all_ends_with_a_summary_and_its_exit_code(pve_root):
    for vmid, hook in ((100, HOOK), (101, ""), (102, HOOK)):
        pve_root.write_vm(vmid, VM + hook)
        assert pve_root.cli("nic", "add", str(vmid), "net1", "--bridge", "br-vhost").returncode == 0
    assert pve_root.cli("apply", "102").returncode == 0
    result = pve_root.cli("apply", "--all")
    assert result.returncode == ExitCode.CONFLICT  # one VM failed: its own code
    assert result.stdout.splitlines()[-1] == ("apply: 3 VMs: 0 written, 2 up to date, 1 failed (VM 101); "
                                              "VMs without the agent's hookscript: pve-vhost-agent enable --all")
    pve_root.vm_path(102).write_text(pve_root.vm_path(102).read_text().replace("memory: 2048", "memory: 4096"))
    shown = json.loads(pve_root.cli("apply", "--all", "--dry-run", "--json").stdout)
    assert shown["summary"].startswith("apply: 3 VMs: 1 to write, 1 up to date, 1 failed (VM 101)")
    assert [vm["vmid"] for vm in shown["vms"]] == [100, 101, 102] and shown["exit_code"] == ExitCode.CONFLICT
    assert pve_root.cli("enable", "101").returncode == 0
    done = pve_root.cli("apply", "--all")
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "apply: 3 VMs: 1 written, 2 up to date, 0 failed"


def test_an_ovs_outage_is_one_problem_until_it_is_over(pve_root, fresh_ovs, caplog):
    ovs = fresh_ovs("h13out")
    service = Service(pve_root.settings(ovsdb=ovs.remote))
    caplog.set_level(logging.INFO, logger="pve_vhost_agent.flows.service")
    try:
        assert service.run_pass().problems == ()
        ovs.stop()
        texts = [str(p) for _ in range(3) for p in service.run_pass().problems]
    finally:
        service.close()
    assert any("lost the connection" in t for t in texts) and any("cannot reach" in t for t in texts), texts
    logged = [r.getMessage() for r in caplog.records if r.name == "pve_vhost_agent.flows.service"]
    assert not [m for m in logged if m.startswith("resolved:")], logged
    assert len([m for m in logged if "OVSDB" in m]) == 1, logged


def test_a_proxmox_nic_on_an_index_the_agent_holds_is_logged_once(pve_root, node_ovs, caplog):
    pve_root.write_vm(100, VM + HOOK)
    assert pve_root.cli("nic", "add", "100", "net1", "--bridge", "br-vhost").returncode == 0
    assert pve_root.cli("apply", "100").returncode == 0
    # The GUI's "Add network device" picks the lowest free netN: net1.
    path = pve_root.vm_path(100)
    path.write_text(path.read_text() + "net1: virtio=BC:24:11:00:00:09,bridge=vmbr0\n")
    service = Service(pve_root.settings(ovsdb=node_ovs.remote))
    caplog.set_level(logging.INFO, logger="pve_vhost_agent.flows.service")
    try:
        reports = [service.run_pass() for _ in range(3)]
    finally:
        service.close()
    assert all("net1 of VM 100 is both a Proxmox NIC" in str(r.problems) for r in reports)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "net1 of VM 100" in r.getMessage()]
    assert len(warned) == 1
