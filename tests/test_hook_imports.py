"""A hook loads only what its phase uses: every VM start pays for each module it imports.

Measured as the issue asks, with `python3 -X importtime` on the hookscript itself (run
isolated, as its `#!` line says).
"""

import os
import re
import subprocess

from conftest import REPO

HOOKSCRIPT = REPO / "hookscripts" / "pve-vhost-agent"
VM = "balloon: 0\nmemory: 128\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n"
NEVER = {"click", "_ssl", "pyroute2", "hashlib", "pve_vhost_agent.cli.nic", "pve_vhost_agent.cli.vm",
         "pve_vhost_agent.flows.service", "pve_vhost_agent.flows.enable", "pve_vhost_agent.flows.declare"}
# Only a VM with QinQ taps (which may be on a Linux bridge) or link ends loads these.
TAPS_AND_LINKS = {"pve_vhost_agent.flows.lbqinq", "pve_vhost_agent.plan.lbqinq", "pve_vhost_agent.adapters.linkstate",
                  "pve_vhost_agent.model.netdevs", "pve_vhost_agent.flows.links", "pve_vhost_agent.plan.links",
                  "pve_vhost_agent.model.links", "pve_vhost_agent.model.lbactions", "pve_vhost_agent.model.linkactions"}


def interpreter() -> list[str]:
    """The hookscript's `#!` line, as the kernel runs it (one argument after the program)."""
    line = HOOKSCRIPT.read_text().splitlines()[0]
    assert line.startswith("#!"), line
    return line[2:].split(maxsplit=1)


def imported(pve_root, vmid: str, phase: str, **env) -> tuple[subprocess.CompletedProcess, set[str]]:
    environment = {"LC_ALL": "C", "PVE_VHOST_AGENT_ROOT": str(pve_root.root), "PVE_VHOST_AGENT_NODE": pve_root.node,
                   "PATH": os.environ["PATH"], **env}
    result = subprocess.run([*interpreter(), "-X", "importtime", str(HOOKSCRIPT), vmid, phase],
                            input=b"", capture_output=True, env=environment, timeout=60)
    lines = result.stderr.decode().splitlines()
    names = {m.group(1).strip() for line in lines if (m := re.match(r"import time:\s+\d+ \|\s+\d+ \|(.*)$", line))}
    assert names, result.stderr
    return result, names


def loaded(names: set[str], wanted: set[str]) -> set[str]:
    return {n for n in names for w in wanted if n == w or n.startswith(w + ".")}


def test_a_vm_that_is_not_the_agents_costs_no_switch_library(pve_root):
    pve_root.write_vm(100, VM)
    result, names = imported(pve_root, "100", "pre-start")
    assert result.returncode == 0 and result.stdout == b""
    assert not loaded(names, NEVER | TAPS_AND_LINKS | {"ovs", "systemd", "subprocess", "pve_vhost_agent.adapters.ovsdb"})


def test_the_hookscript_runs_without_site_and_loads_debians_packages_only(pve_root):
    # No `site`: no .pth file runs and /usr/local's packages (pip's) cannot shadow Debian's
    # python3-openvswitch in a process that runs as root.
    assert interpreter() == ["/usr/bin/python3", "-IS"]
    pve_root.write_vm(100, VM)
    probe = ("import sys; print([p for p in sys.path if 'packages' in p]); "
             "print('site' in sys.modules)")
    code = HOOKSCRIPT.read_text().replace("try:\n    from pve_vhost_agent", f"{probe}\ntry:\n    from pve_vhost_agent", 1)
    result = subprocess.run([*interpreter(), "-c", code, "100", "pre-start"], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "PVE_VHOST_AGENT_ROOT": str(pve_root.root)}, timeout=60)
    paths, site = result.stdout.splitlines()[:2]
    assert result.returncode == 0 and site == "False", result
    assert paths == repr([f"{pve_root.root}/usr/lib/python3/dist-packages", "/usr/lib/python3/dist-packages"])


def test_a_pre_start_with_vhost_user_nics_loads_ovs_but_not_the_command_line(pve_root, ovs):
    pve_root.write_vm(100, VM)
    assert pve_root.cli("nic", "add", "100", "net1", "--bridge", "h3imp0").returncode == 0
    assert pve_root.cli("enable", "100").returncode == 0
    # This OVS is not the DPDK build: the start is refused, after everything was loaded.
    result, names = imported(pve_root, "100", "pre-start", PVE_VHOST_AGENT_OVSDB=ovs.remote)
    assert result.returncode == 8 and b"cannot make vhost-user ports" in result.stdout, result.stdout
    assert loaded(names, {"ovs.db.idl", "pve_vhost_agent.plan.hook"}) == {"ovs.db.idl", "pve_vhost_agent.plan.hook"}
    assert not loaded(names, NEVER | TAPS_AND_LINKS), sorted(loaded(names, NEVER | TAPS_AND_LINKS))
    # The QEMU version is cached now: the next start runs no program and loads no subprocess.
    result, names = imported(pve_root, "100", "pre-start", PVE_VHOST_AGENT_OVSDB=ovs.remote)
    assert result.returncode == 8, result.stdout
    unwanted = NEVER | TAPS_AND_LINKS | {"subprocess", "shutil"}
    assert not loaded(names, unwanted), sorted(loaded(names, unwanted))
