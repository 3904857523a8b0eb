"""The Proxmox GUI shows which NICs the agent holds (issue 13, item 4).

An enabled VM with vhost-user NICs carries the tag `vhost-user` and one notes line naming
them (plan/marks.py); both follow the spec, go with `disable`, and never touch the user's
own tags or notes: the config is byte for byte what it was once the marks are gone.
"""

from __future__ import annotations

import json
from urllib.parse import unquote

from pve_vhost_agent.formats.vmconfig import VmConfig

USER = """\
#My router%3A **do not reboot** during business hours
#
#Owner%3A net-team
balloon: 0
memory: 1024
name: router
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0
tags: prod;edge
"""


def config(root, vmid=100) -> VmConfig:
    return VmConfig.parse(root.vm_path(vmid).read_text())


def notes(root, vmid=100) -> list[str]:
    """The VM's notes as the GUI shows them (decoded as qemu-server decodes them)."""
    return [unquote(line) for line in config(root, vmid).description_lines()]


def ok(root, *args):
    result = root.cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_enable_marks_the_vm_in_step_with_its_nics_and_disable_leaves_the_users_bytes(pve_root):
    pve_root.write_vm(100, USER)
    ok(pve_root, "nic", "add", "100", "net1", "--bridge", "br-vhost")
    ok(pve_root, "enable", "100")
    assert config(pve_root).section()["tags"] == "prod;edge;vhost-user"
    assert notes(pve_root) == ["My router: **do not reboot** during business hours", "", "Owner: net-team",
                               "pve-vhost-agent: vhost-user NICs net1 (br-vhost); Proxmox NICs need other netN"]
    ok(pve_root, "nic", "add", "100", "net3", "--bridge", "br-vpp", "--backend", "external")
    assert notes(pve_root)[-1] == ("pve-vhost-agent: vhost-user NICs net1 (br-vhost), net3 (br-vpp); "
                                   "Proxmox NICs need other netN")
    text = pve_root.vm_path(100).read_text()
    assert text.count("pve-vhost-agent%3A") == 1 and text.count(";vhost-user") == 1  # one line, one tag
    ok(pve_root, "disable", "100")
    assert pve_root.vm_path(100).read_text() == USER


def test_the_last_nic_removed_takes_the_marks_along(pve_root):
    pve_root.write_vm(100, USER.replace("tags: prod;edge\n", ""))
    ok(pve_root, "nic", "add", "100", "net1", "--bridge", "br-vhost")
    ok(pve_root, "enable", "100")
    assert config(pve_root).section()["tags"] == "vhost-user"
    ok(pve_root, "nic", "remove", "100", "net1")
    after = config(pve_root)
    assert "tags" not in after.section() and not any("pve-vhost-agent" in n for n in notes(pve_root))


def test_apply_puts_back_a_mark_the_gui_removed_and_a_running_vm_gets_it_at_once(pve_root):
    pve_root.write_vm(100, USER + "hookscript: local:snippets/pve-vhost-agent\n")
    ok(pve_root, "nic", "add", "100", "net1", "--bridge", "br-vhost")
    path = pve_root.vm_path(100)
    path.write_text(path.read_text().replace(";vhost-user", ""))  # removed in the GUI's tag editor
    out = ok(pve_root, "apply", "100")
    assert out == "VM 100: marked in the Proxmox GUI (tag vhost-user added)\n"
    assert config(pve_root).section()["tags"] == "prod;edge;vhost-user"
    assert ok(pve_root, "apply", "100") == "VM 100: args up to date\n"


def test_install_hook_and_enable_use_the_storages_content_dirs(pve_root):
    """Proxmox resolves local:snippets/... through storage.cfg's content-dirs: so does the agent."""
    (pve_root.root / "etc/pve/storage.cfg").write_text(
        "dir: local\n\tpath /var/lib/vz\n\tcontent snippets\n\tcontent-dirs snippets=hooks\n")
    shown = json.loads(ok(pve_root, "install-hook", "--json"))
    assert shown["folder"] == str(pve_root.root / "var/lib/vz/hooks") and shown["changed"] is True
    assert (pve_root.root / "var/lib/vz/hooks/pve-vhost-agent").stat().st_mode & 0o111
    pve_root.write_vm(100, USER)
    out = json.loads(ok(pve_root, "enable", "100", "--json"))
    assert out["vms"][0]["vmid"] == 100 and str(pve_root.root / "var/lib/vz/hooks") in out["vms"][0]["lines"][0]
