"""`pve-vhost-agent adopt` on a Proxmox-like root: the whole plan in a dry run, nothing
written on a refusal, pending changes on a running VM, every VM with --all."""

import json

from fixtures.fakeqemu import start_fake_qemu
from pve_vhost_agent.errors import ExitCode

VM = "balloon: 0\nmemory: 2048\nname: router\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n"
RECIPE = ("-chardev socket,id=char1,path=/var/run/vpp/vm-{vmid}-0.sock,reconnect=2 "
          "-netdev type=vhost-user,id=vm-{vmid}-0,chardev=char1,vhostforce=on "
          "-object memory-backend-file,id=mem1000,size=2048M,mem-path=/dev/shm,share=on "
          "-numa node,memdev=mem1000 "
          "-device virtio-net-pci,netdev=vm-{vmid}-0,mac=02:AA:BB:CC:{vmid:02X}:01,rx_queue_size=1024")


def vm(pve_root, vmid=100, extra=""):
    pve_root.write_vm(vmid, VM + f"args: -smbios type=1 {RECIPE.format(vmid=vmid % 256)}\n" + extra)


def test_a_dry_run_shows_the_whole_plan_and_writes_nothing(pve_root):
    vm(pve_root)
    before = pve_root.snapshot()
    result = pve_root.cli("adopt", "100", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "dry run: would declare net1: vhost-user on bridge vhostbr0, backend external, MAC 02:AA:BB:CC:64:01" in out
    assert "QEMU keeps connecting to /var/run/vpp/vm-100-0.sock" in out
    assert "a memfd backend needs no /dev/shm room, so its resize is no longer needed" in out
    assert "its args line would become: -smbios type=1 -object memory-backend-memfd,id=vhu-mem,size=2048M" in out
    assert pve_root.snapshot() == before


def test_adopting_declares_the_nic_and_rewrites_the_line_once(pve_root):
    vm(pve_root)
    assert pve_root.cli("adopt", "100").returncode == 0
    nic = json.loads(pve_root.cli("nic", "list", "100", "--json").stdout)[0]
    assert (nic["nic"], nic["backend"], nic["mac"], nic["socket"]) == (
        "net1", "external", "02:AA:BB:CC:64:01", "/var/run/vpp/vm-100-0.sock")
    shown = json.loads(pve_root.cli("show", "100", "--json").stdout)
    assert shown["in_sync"] and shown["args_line"].startswith("-smbios type=1 -object memory-backend-memfd")
    again = pve_root.cli("adopt", "100")
    assert again.returncode == ExitCode.CONFLICT and "no hand-written vhost-user NIC" in again.stderr


def test_a_refusal_names_each_word_and_writes_nothing(pve_root):
    pve_root.write_vm(100, VM + "args: " + RECIPE.format(vmid=100).replace("size=2048M", "size=4096M")
                      .replace("reconnect=2", "reconnect=2,logfile=/tmp/q") + "\n")
    before = pve_root.snapshot()
    result = pve_root.cli("adopt", "100")
    assert result.returncode == ExitCode.CONFLICT
    lines = result.stderr.splitlines()
    assert any("option `logfile`" in line for line in lines) and any("size=4096M" in line for line in lines)
    assert lines[-1] == "VM 100: nothing was written" and "Traceback" not in result.stderr
    assert pve_root.snapshot() == before


def test_a_running_vm_gets_pending_changes_only(pve_root):
    vm(pve_root)
    qemu = start_fake_qemu(pve_root.settings().qemu_pidfile(100))
    try:
        assert pve_root.cli("adopt", "100").returncode == 0
    finally:
        qemu.kill()
        qemu.wait()
    text = pve_root.vm_path(100).read_text()
    main, pending = text.split("[PENDING]")
    assert "-numa node,memdev=mem1000" in main  # what the running QEMU runs with is left alone
    assert "args: -smbios type=1 -object memory-backend-memfd" in pending


def test_all_adopts_every_vm_with_a_hand_written_line_and_the_patched_convention_on_request(pve_root):
    vm(pve_root, 100)
    vm(pve_root, 101)
    pve_root.write_vm(102, VM + "net1: virtio=BC:24:11:00:00:02,bridge=vmbr1,tag=950,trunks=10;20\n")
    result = pve_root.cli("adopt", "--all", "--patched-qinq", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["vmid"]: row for row in json.loads(result.stdout)}
    assert sorted(rows) == [100, 101, 102] and rows[102]["qinq"] == ["net1"]
    assert "net1: virtio=BC:24:11:00:00:02,bridge=vmbr1,tag=950\n" in pve_root.vm_path(102).read_text()
    listed = pve_root.cli("nic", "list").stdout
    assert "102 net1: QinQ on tap102i1, S-tag 950 (802.1ad), C-VLANs 10,20" in listed


def test_adopting_enables_the_vm_and_chains_the_hookscript_it_had(pve_root):
    """An adopted VM must start with the agent's pre-start (its `ovs` NICs need their
    ports made): adopt sets the hookscript in the same write, keeps the VM's own one
    chained, and marks the VM for the GUI."""
    own = pve_root.root / "var/lib/vz/snippets/old.pl"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text("#!/usr/bin/perl\nexit 0;\n")
    own.chmod(0o755)
    vm(pve_root, extra="hookscript: local:snippets/old.pl\n")
    dry = pve_root.cli("adopt", "100", "--dry-run")
    assert "hookscript would be local:snippets/pve-vhost-agent; its own local:snippets/old.pl runs after" in dry.stdout
    result = pve_root.cli("adopt", "100", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)[0]
    assert (row["hookscript"], row["chained_hookscript"]) == ("local:snippets/pve-vhost-agent", "local:snippets/old.pl")
    text = pve_root.vm_path(100).read_text()
    assert "hookscript: local:snippets/pve-vhost-agent\n" in text and "tags: vhost-user\n" in text
    assert (pve_root.root / "var/lib/vz/snippets/pve-vhost-agent").stat().st_mode & 0o777 == 0o755
    assert json.loads(pve_root.cli("show", "100", "--json").stdout)["in_sync"]
    undone = pve_root.cli("disable", "100")
    assert undone.returncode == 0 and "hookscript: local:snippets/old.pl\n" in pve_root.vm_path(100).read_text()


def test_a_hookscript_proxmox_could_not_run_stops_the_adoption_before_anything_is_written(pve_root):
    vm(pve_root, extra="hookscript: local:snippets/gone.pl\n")
    before = pve_root.snapshot()
    result = pve_root.cli("adopt", "100")
    assert result.returncode == ExitCode.NOT_FOUND, result.stderr
    assert "VM 100's hookscript local:snippets/gone.pl" in result.stderr and "pve-vhost-agent adopt 100" in result.stderr
    assert pve_root.snapshot() == before
