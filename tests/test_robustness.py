"""A hostile operator's inputs: every one gets one line with its fix and an exit code, or is
taken as it should be. Never a traceback, nothing written on a refusal, and one VM's bad
config never stops the others.

The cases seen in review are tables run as a user runs the command (a process of its own);
the property-based parts (hypothesis, bounded) generate command lines, spec files, VM
configs, args lines, odd files and hook environments; then writers killed at random points
and writers in parallel. The slowest parts are marked `slow` (still part of ./test).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import stat
import subprocess
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from pve_vhost_agent.adapters import qemu
from pve_vhost_agent.cli import common, hookscript, main
from pve_vhost_agent.errors import AgentError, ExitCode, VmBusy
from pve_vhost_agent.flows import declare, hook as hookflow
from pve_vhost_agent.formats import qemuargs
from pve_vhost_agent.formats.specfile import format_spec, parse_spec
from pve_vhost_agent.formats.storagecfg import parse_storages
from pve_vhost_agent.formats.vmconfig import VmConfig
from pve_vhost_agent.model.fields import NicChange
from pve_vhost_agent.model.spec import ClusterSpec, VmSpec
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.plan.argsync import sync_args
from pve_vhost_agent.plan.node import plan_node
from pve_vhost_agent.plan.observed import LocalVm, NodeState

from builders import SOCKET_DIRS, nic as vhost_nic
from fixtures.pveroot import PveRoot
from conftest import REPO
from pvestandin.layout import mark_pmxcfs

# A VM the agent can serve: no ballooning, numa off.
ROUTER = "balloon: 0\nboot: order=scsi0\nmemory: 1024\nname: router\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n"
ENABLED = ROUTER + "hookscript: local:snippets/pve-vhost-agent\n"
HOOKSCRIPT = REPO / "hookscripts" / "pve-vhost-agent"
AGENT_ARGS = ("-object memory-backend-memfd,id=vhu-mem,size=1024M,share=on -machine memory-backend=vhu-mem")
TRACEBACK = "Traceback (most recent call last)"
BUG = "this is a bug in pve-vhost-agent"


def one_line_error(result: subprocess.CompletedProcess, code: int | None = None, words: str = "") -> None:
    """The command failed the agent's way: its exit code, one line `pve-vhost-agent: problem; fix`."""
    assert result.returncode != 0 and (code is None or result.returncode == code), (result.returncode, result.stderr)
    assert TRACEBACK not in result.stdout + result.stderr and BUG not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("pve-vhost-agent: "), result.stderr
    assert "; " in result.stderr, result.stderr  # problem; fix
    assert words in result.stderr, result.stderr


def ok(root, *argv: str) -> str:
    """A step a test stands on (set-up, a read to check), run in this process: its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = common.call(main.main, ["--root", str(root.root), "--node", root.node, *argv])
    assert code == 0, err.getvalue()
    return out.getvalue()


def hook(root, *argv: str, **env) -> subprocess.CompletedProcess:
    """The hookscript as Proxmox runs it (argv, LC_ALL=C, empty stdin), against `root`."""
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "PVE_VHOST_AGENT_ROOT": str(root.root),
                   "PVE_VHOST_AGENT_NODE": root.node, "PVE_MIGRATED_FROM": "",
                   "PVE_VHOST_AGENT_OVSDB": f"unix:{root.root}/no-ovsdb.sock", **env}
    return subprocess.run([str(HOOKSCRIPT), *argv], input="", capture_output=True, text=True, env=environment,
                          timeout=60)


@pytest.fixture
def node(pve_root):
    """VM 100 (this node, enabled, one vhost-user NIC) and VM 200 of another node."""
    pve_root.write_vm(100, ROUTER)
    pve_root.write_vm(200, ROUTER, node="pve2")
    ok(pve_root, "nic", "add", "100", "net1", "--bridge", "brv", "--mac", "02:00:00:00:00:01")
    ok(pve_root, "enable", "100")
    return pve_root


# --- the command line: one line for every mistake, numbers in ASCII digits ------------------

NUMBERS = [
    # (what, argv, exit code, words)
    ("Unicode digits as a VM id (int() read ١٠٠ as 100)", ("nic", "add", "١٠٠", "net2", "--bridge", "br0"), 2,
     "'١٠٠' is not a VM id"),
    ("a VM id with an underscore (int() read 1_00 as 100)", ("show", "1_00"), 2, "'1_00' is not a VM id"),
    ("a VM id with blanks", ("show", " 100"), 2, "is not a VM id"),
    ("a 5,000-digit VM id", ("show", "9" * 5000), 2, "is not a VM id"),
    ("a superscript trunk", ("nic", "add", "100", "net2", "--bridge", "br0", "--trunks", "²"), 3, "trunk VLAN list '²'"),
    ("a superscript C-VLAN", ("nic", "add", "100", "net2", "--bridge", "br0", "--qinq", "5", "--cvlans", "²"), 3,
     "customer VLAN list '²'"),
    ("Arabic-Indic digits as a tag", ("nic", "add", "100", "net2", "--bridge", "br0", "--tag", "١٠"), 3, "is not a number"),
    ("a 5,000-digit tag", ("nic", "add", "100", "net2", "--bridge", "br0", "--tag", "9" * 5000), 3, "is not a number"),
    ("a 5,000-digit NIC index", ("nic", "add", "100", "net" + "1" * 5000, "--bridge", "br0"), 3, "is not a NIC name"),
    ("a superscript hook VM id", ("hook", "²", "pre-start"), 2, "VM id '²' is not a positive integer"),
    ("an interval that is not a number", ("service", "--once", "--interval", "nan"), 2, "'nan' is not a number of seconds"),
    ("an endless interval", ("service", "--once", "--interval", "inf"), 2, "'inf' is not a number of seconds"),
    ("an interval in Unicode digits", ("service", "--once", "--interval", "١٠"), 2, "is not a number of seconds"),
    ("an OVSDB over SSL", ("--ovsdb", "ssl:x:1", "nic", "list"), 2, "OVSDB remote 'ssl:x:1' is not unix:/absolute/path"),
    ("an OVSDB over TCP", ("--ovsdb", "tcp:127.0.0.1:6640", "status"), 2, "is not unix:/absolute/path"),
    ("a node name that is a path", ("--node", "../pve2", "nic", "list"), 2, "is not a Proxmox node name"),
    ("a storage id that is a path", ("enable", "100", "--storage", "../../tmp"), 2, "'../../tmp' is not a storage id"),
]


@pytest.mark.parametrize("argv, code, words", [c[1:] for c in NUMBERS], ids=[c[0] for c in NUMBERS])
def test_numbers_and_settings_are_checked_at_the_edge(node, argv, code, words):
    before = node.snapshot()
    one_line_error(node.cli(*argv), code, words)
    assert node.snapshot() == before


USAGE = [
    ("a mistyped command", ("nic", "ad", "100", "net2"), "no such command 'ad'; did you mean `pve-vhost-agent nic add`?"),
    ("a mistyped top command", ("shwo", "100"), "no such command 'shwo'; did you mean `pve-vhost-agent show`?"),
    ("an unknown command", ("frobnicate",), "no such command 'frobnicate'; see `pve-vhost-agent -h`"),
    ("a mistyped option", ("nic", "add", "100", "net2", "--brige", "br0"), "no such option --brige; did you mean --bridge?"),
    ("a missing argument", ("nic", "add", "100"), "missing argument 'NIC'; see `pve-vhost-agent nic add -h`"),
    ("a missing option value", ("nic", "add", "100", "net2", "--bridge"), "option '--bridge' requires an argument"),
    ("an extra argument", ("show", "100", "101"), "got unexpected extra argument (101)"),
    ("a bad choice", ("nic", "add", "100", "net2", "--bridge", "b", "--backend", "vpp"), "invalid value for '--backend'"),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in USAGE], ids=[c[0] for c in USAGE])
def test_usage_errors_are_one_line_like_the_agents_own(node, argv, words):
    # click printed `Usage: ...`, a `Try ...` line, a blank line and `Error: ...`.
    result = node.cli(*argv)
    one_line_error(result, ExitCode.USAGE, words)
    assert result.stdout == ""


def test_an_unexpected_exception_is_one_line_naming_a_bug_never_a_traceback(pve_root, monkeypatch, capsys):
    def broken(*_args, **_kwargs):
        raise KeyError("a key no one expected\nwith a second line")

    monkeypatch.setattr(declare, "load_spec", broken)
    code = common.call(main.main, ["--root", str(pve_root.root), "--node", "pve1", "nic", "list"])
    out, err = capsys.readouterr()
    assert code == ExitCode.FAILURE and out == ""
    assert err.count("\n") == 1 and err.startswith("pve-vhost-agent: unexpected KeyError: ")
    assert BUG in err and "please report it" in err and TRACEBACK not in err


def test_the_hookscript_says_an_unexpected_exception_in_one_line_and_fails_the_phase(pve_root, monkeypatch, capsys):
    monkeypatch.setattr(hookflow, "run_hook", lambda *_args: [][1])
    code = hookscript.main(["100", "pre-start"], {"PVE_VHOST_AGENT_ROOT": str(pve_root.root),
                                                  "PVE_VHOST_AGENT_NODE": "pve1"})
    out, err = capsys.readouterr()
    assert code == ExitCode.FAILURE and out == ""  # non-zero: pre-start aborts the start
    assert err.count("\n") == 1 and "unexpected IndexError" in err and BUG in err


# --- files: decoded and bounded before they are parsed -----------------------------------------

def _spec_file(root, vmid: int, text: str) -> None:
    path = root.spec_file(vmid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


SPEC_FILES = [
    ("a superscript tag", "vhostuser: 100-net1\n\tbridge brv\n\tmac 02:00:00:00:00:01\n\ttag ²\n", "tag '²' is not a number"),
    ("a 5,000-digit tag", "vhostuser: 100-net1\n\tbridge brv\n\tmac 02:00:00:00:00:01\n\ttag " + "9" * 5000 + "\n",
     "is not a number"),
    ("a 5,000-digit VM id in a section id", "vhostuser: " + "1" * 5000 + "-net1\n\tbridge brv\n\tmac 02:00:00:00:00:01\n",
     "is not <vmid>-net<N>"),
    ("a 5,000-digit NIC index in a section id", "vhostuser: 100-net" + "1" * 5000 + "\n\tbridge brv\n", "is not <vmid>-net<N>"),
    ("a 5,000-digit VM id in a vm section", "vm: " + "1" * 5000 + "\n\tchain-hookscript local:snippets/a.sh\n",
     "is not a VM id"),
]


@pytest.mark.parametrize("text, words", [c[1:] for c in SPEC_FILES], ids=[c[0] for c in SPEC_FILES])
def test_a_bad_number_in_the_spec_file_is_a_bad_spec_named_by_its_line(node, text, words):
    _spec_file(node, 100, text)
    before = node.snapshot()
    for argv in (("nic", "list"), ("show", "100"), ("nic", "add", "100", "net2", "--bridge", "brv")):
        one_line_error(node.cli(*argv), ExitCode.BAD_SPEC, words)
    pre_start = hook(node, "100", "pre-start")
    assert pre_start.returncode == ExitCode.BAD_SPEC and TRACEBACK not in pre_start.stderr + pre_start.stdout
    assert node.snapshot() == before


def test_a_byte_that_is_not_utf8_in_storage_cfg_breaks_nothing(pve_root):
    # enable, install-hook and every phase of a VM with a chained hookscript read storage.cfg.
    (pve_root.root / "etc/pve/storage.cfg").write_bytes(
        b"dir: local\n\tpath /var/lib/vz\n\tcontent snippets\n\tcomment caf\xe9 \xff\n")
    chained = pve_root.root / "var/lib/vz/snippets/old.sh"
    chained.parent.mkdir(parents=True)
    chained.write_text("#!/bin/sh\necho old hook $1 $2\n")
    chained.chmod(0o755)
    pve_root.write_vm(100, ROUTER + "hookscript: local:snippets/old.sh\n")
    result = pve_root.cli("install-hook")
    assert result.returncode == 0, result.stderr
    result = pve_root.cli("enable", "100")
    assert result.returncode == 0, result.stderr
    for phase in ("pre-start", "post-start", "pre-stop", "post-stop"):
        result = hook(pve_root, "100", phase)
        assert (result.returncode, result.stderr) == (0, ""), result
        assert f"old hook 100 {phase}" in result.stdout


ODD_FILES = [
    # (what, the file, make it odd, argv, exit code, words)
    ("a spec file that is a FIFO", lambda root: root.spec_file(100), os.mkfifo, ("nic", "list"), ExitCode.CONFLICT,
     "is not a regular file"),
    ("a spec file that is a folder", lambda root: root.spec_file(100), os.mkdir, ("show", "100"), ExitCode.FAILURE,
     "Is a directory"),
    ("a VM config that is a FIFO", lambda root: root.vm_path(100), os.mkfifo, ("apply", "100"), ExitCode.CONFLICT,
     "is not a regular file"),
    ("storage.cfg that is a FIFO", lambda root: root.root / "etc/pve/storage.cfg", os.mkfifo, ("install-hook",),
     ExitCode.CONFLICT, "is not a regular file"),
]


@pytest.mark.parametrize("where, make, argv, code, words", [c[1:] for c in ODD_FILES], ids=[c[0] for c in ODD_FILES])
def test_an_odd_file_where_a_file_should_be_is_one_line_never_a_hang(node, where, make, argv, code, words):
    path = where(node)
    path.unlink(missing_ok=True)
    make(path)
    before = node.snapshot()
    one_line_error(node.cli(*argv, timeout=30), code, words)  # a read of a FIFO would wait for ever
    assert node.snapshot() == before


def test_names_with_5000_digits_in_the_socket_folder_and_the_args_are_not_the_agents(node):
    folder = node.root / "run/pve-vhost-agent/ovs"
    (folder / f"vm-{'1' * 5000}-1.sock"[:250]).write_text("")  # a file name is at most 255 bytes
    (folder / f"vm-100-{'1' * 200}.sock").write_text("")
    path = node.vm_path(100)
    path.write_text(path.read_text().replace("args: ", f"args: -device e1000,id=vhu-net{'1' * 5000} "))
    for argv in (("status",), ("service", "--dry-run"), ("show", "100"), ("apply", "100")):
        result = node.cli("--ovsdb", f"unix:{node.root}/no-ovsdb.sock", *argv)
        assert TRACEBACK not in result.stdout + result.stderr and BUG not in result.stderr, result.stderr


# --- one VM's bad config never stops the node -----------------------------------------------

CONTROL = "-smbios type=1,serial=a\rb"


def test_a_carriage_return_in_args_is_that_vms_conflict_and_nothing_is_written(node):
    path = node.vm_path(100)
    path.write_text(path.read_text().replace("args: ", f"args: {CONTROL} "))
    before = node.snapshot()
    # Stale (a second NIC declared), so the line must be written: refused with the fix.
    for argv in (("nic", "add", "100", "net2", "--bridge", "brv"), ("nic", "set", "100", "net1", "--queues", "2")):
        one_line_error(node.cli(*argv), ExitCode.CONFLICT, "control character (U+000D)")
    assert node.snapshot() == before
    node.spec_file(100).write_text(node.spec_file(100).read_text().rstrip("\n") + "\n\tqueues 2\n\n")
    before = node.snapshot()
    one_line_error(node.cli("apply", "100"), ExitCode.CONFLICT, "qm set VMID --args")
    assert node.snapshot() == before


def test_the_service_serves_the_other_vms_when_one_has_a_control_character(node):
    node.write_vm(101, ENABLED)
    ok(node, "nic", "add", "101", "net1", "--bridge", "brv")
    ok(node, "apply", "101")
    for vmid, extra in ((100, CONTROL), (101, "")):  # both stale: memory changed
        path = node.vm_path(vmid)
        path.write_text(path.read_text().replace("memory: 1024", "memory: 2048").replace("args: ", f"args: {extra} "))
    no_ovs = ("--ovsdb", f"unix:{node.root}/no-ovsdb.sock")
    status = node.cli(*no_ovs, "status", "--json")
    assert status.returncode != 0 and TRACEBACK not in status.stderr
    assert any("VM 100" in p and "control character" in p for p in json_problems(status.stdout))
    result = node.cli(*no_ovs, "service", "--once")
    assert TRACEBACK not in result.stdout + result.stderr and result.returncode != 0
    assert "size=2048M" in node.vm_path(101).read_text()  # served
    assert "size=1024M" in node.vm_path(100).read_text() and "VM 100" in result.stderr  # its problem, said
    applied = node.cli(*no_ovs, "apply", "--all")
    assert applied.returncode == ExitCode.CONFLICT and "VM 100: " in applied.stderr and TRACEBACK not in applied.stderr
    assert "VM 101: args up to date" in applied.stdout


def json_problems(text: str) -> list[str]:
    summary = json.loads(text)
    return [str(p) for p in summary.get("problems", [])] + [summary.get("line", "")]


SWALLOWED = [
    ("an option without its value", "-device " + AGENT_ARGS),
    ("a trailing backslash", "-smbios type=1\\ " + AGENT_ARGS),
]


@pytest.mark.parametrize("line", [c[1] for c in SWALLOWED], ids=[c[0] for c in SWALLOWED])
def test_a_user_word_that_swallows_the_agents_first_word_is_refused(pve_root, line):
    # `apply` wrote the agent's memory backend a second time and said all was well.
    pve_root.write_vm(100, ENABLED + f"args: {line}\n")
    pve_root.spec_file(100).parent.mkdir(parents=True)
    pve_root.spec_file(100).write_text("vhostuser: 100-net1\n\tbridge brv\n\tmac 02:00:00:00:00:01\n\n")
    before = pve_root.snapshot()
    one_line_error(pve_root.cli("apply", "100"), ExitCode.CONFLICT, "took the agent's option as its own")
    pve_root.spec_file(100).unlink()  # with no spec left, the agent's words cannot be taken out either
    one_line_error(pve_root.cli("apply", "100"), ExitCode.CONFLICT, "took the agent's option as its own")
    pve_root.spec_file(100).write_text("vhostuser: 100-net1\n\tbridge brv\n\tmac 02:00:00:00:00:01\n\n")
    assert pve_root.snapshot() == before


@pytest.mark.parametrize("memory", ["0", "15", "8388609", "99999999999", "١٠٢٤", "1024.5"])
def test_memory_outside_what_proxmox_takes_is_refused(node, memory):
    path = node.vm_path(100)
    path.write_text(path.read_text().replace("memory: 1024", f"memory: {memory}"))
    before = node.snapshot()
    one_line_error(node.cli("apply", "100"), ExitCode.CONFLICT, "memory")
    assert node.snapshot() == before


def test_a_config_over_pmxcfs_limit_is_refused_before_it_is_parsed(node):
    path = node.vm_path(100)
    path.write_text(path.read_text().replace("args: ", "args: " + "-x " * 600_000))  # 1.8 MB
    before = node.snapshot()
    started = time.monotonic()
    one_line_error(node.cli("nic", "set", "100", "net1", "--tag", "5"), ExitCode.CONFLICT, "over pmxcfs's 1 MiB limit")
    assert time.monotonic() - started < 10  # it took 37 s, parsing the line again and again
    assert node.snapshot() == before


# --- leftovers and links in /etc/pve -----------------------------------------------------------

def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["/bin/true"])
    proc.wait()
    return proc.pid


def test_temp_files_of_killed_writers_are_removed_by_the_next_writer(node):
    dead, alive = dead_pid(), os.getpid()
    spec_dir, vm_dir = node.spec_file(100).parent, node.vm_path(100).parent
    leftovers = [spec_dir / f"100.cfg.tmp.{dead}", spec_dir / f"300.cfg.tmp.{dead}", vm_dir / f"100.conf.tmp.{dead}"]
    kept = [spec_dir / f"100.cfg.tmp.{alive}",  # a live process of that pid: perhaps still writing
            vm_dir / f"101.conf.tmp.{dead}"]  # another VM's config: not under the lock this write holds
    for path in leftovers + kept:
        path.write_text("half a file")
    result = node.cli("nic", "add", "100", "net2", "--bridge", "brv")  # writes the spec and the args
    assert result.returncode == 0, result.stderr
    assert [p.exists() for p in leftovers] == [False] * len(leftovers)
    assert [p.exists() for p in kept] == [True] * len(kept)


def test_a_spec_file_that_is_a_symbolic_link_is_not_replaced(node):
    spec = node.spec_file(100)
    target = node.root / "elsewhere.cfg"
    target.write_text(spec.read_text())
    spec.unlink()
    spec.symlink_to(target)
    before = node.snapshot()
    one_line_error(node.cli("nic", "add", "100", "net2", "--bridge", "brv"), ExitCode.CONFLICT, "is a symbolic link")
    one_line_error(node.cli("nic", "remove", "100", "net1"), ExitCode.CONFLICT, "is a symbolic link")
    assert spec.is_symlink() and node.snapshot() == before
    assert ok(node, "nic", "list", "100").startswith("100 net1: ")  # reading through it still works


# --- spec and args change together or not at all ------------------------------------------------

def _spec_bytes(root) -> dict:
    folder = root.spec_file(100).parent
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


LOCKED_OR_FULL = [
    ("nic add", ("nic", "add", "100", "net2", "--bridge", "brv")),
    ("nic set", ("nic", "set", "100", "net1", "--queues", "2")),
    ("nic remove", ("nic", "remove", "100", "net1")),
]


@pytest.mark.parametrize("argv", [c[1] for c in LOCKED_OR_FULL], ids=[c[0] for c in LOCKED_OR_FULL])
def test_a_vm_locked_by_a_backup_gets_neither_spec_nor_args_and_the_retry_works(node, argv):
    # The spec was written, the args were not, and the retry said "already declared".
    path = node.vm_path(100)
    unlocked = path.read_text()
    path.write_text(unlocked + "lock: backup\n")
    before = node.snapshot()
    one_line_error(node.cli(*argv), ExitCode.CONFLICT, "VM 100 is locked by Proxmox (backup)")
    assert node.snapshot() == before
    path.write_text(unlocked)  # the backup ended
    retry = node.cli(*argv)
    assert retry.returncode == 0, retry.stderr
    assert ok(node, "show", "100").count("the VM config has exactly these args") == 1


def test_a_config_the_new_args_would_push_over_pmxcfs_limit_gets_neither(node):
    path = node.vm_path(100)
    room = 1024 * 1024 - 100 - path.stat().st_size  # net2's args need some 250 bytes more
    lines, rest = divmod(room, 100)
    path.write_text("".join(f"#{'x' * 98}\n" for _ in range(lines)) + f"#{'x' * (rest - 2)}\n" + path.read_text())
    assert 1024 * 1024 - path.stat().st_size == 100
    before = node.snapshot()
    one_line_error(node.cli("nic", "add", "100", "net2", "--bridge", "brv", "--queues", "4"), ExitCode.CONFLICT,
                   "over pmxcfs's 1 MiB limit")
    assert node.snapshot() == before


def test_args_that_cannot_be_written_take_the_declaration_back(node):
    # Proxmox's VM lock held (a `qm` task) when the args are written, after the spec was.

    settings = node.settings(lock_timeout=0.3)
    lock = settings.vm_lock(100)
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(["/usr/bin/python3", "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = node.snapshot()
        with pytest.raises(VmBusy, match=r"nothing was changed: the declaration was taken back"):
            declare.add_nic(settings, 100, "net2", NicChange({"bridge": "brv"}), False)
        assert node.snapshot() == before
    finally:
        holder.kill()
        holder.wait()
    ok(node, "nic", "add", "100", "net2", "--bridge", "brv")
    assert "net2" in ok(node, "show", "100")


# --- folders and trust ------------------------------------------------------------------------

def test_folders_made_under_umask_000_are_0755(pve_root):
    pve_root.write_vm(100, ROUTER)
    argv = ["/usr/bin/python3", "-m", "pve_vhost_agent", "--root", str(pve_root.root), "--node", "pve1"]
    for args in (("nic", "add", "100", "net1", "--bridge", "brv", "--backend", "external"), ("enable", "100")):
        result = subprocess.run(argv + list(args), cwd=REPO, capture_output=True, text=True, timeout=60, umask=0)
        assert result.returncode == 0, result.stderr
    made = [pve_root.root / "var/lib/vz/snippets", pve_root.root / "run/pve-vhost-agent",
            pve_root.root / "run/pve-vhost-agent/external"]
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in made} == {str(p): 0o755 for p in made}


def test_a_world_writable_socket_folder_is_refused_at_enable_and_at_pre_start(pve_root):
    pve_root.write_vm(100, ROUTER)
    ok(pve_root, "nic", "add", "100", "net1", "--bridge", "brv")
    folder = pve_root.root / "run/pve-vhost-agent/ovs"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    before = pve_root.snapshot()
    one_line_error(pve_root.cli("enable", "100"), ExitCode.CONFLICT, "is writable by others (mode 0777)")
    assert pve_root.snapshot() == before  # nothing installed, nothing set
    folder.chmod(0o755)
    ok(pve_root, "enable", "100")
    folder.chmod(0o777)  # someone opened it up since
    result = hook(pve_root, "100", "pre-start")
    assert result.returncode == ExitCode.CONFLICT and "is writable by others" in result.stdout
    assert TRACEBACK not in result.stdout + result.stderr


def test_enable_of_another_nodes_vm_installs_nothing(pve_root):
    pve_root.write_vm(200, ROUTER, node="pve2")
    before = pve_root.snapshot()
    one_line_error(pve_root.cli("enable", "200"), ExitCode.CONFLICT, "VM 200 lives on node pve2; run this on pve2")
    assert pve_root.snapshot() == before


@pytest.mark.parametrize("source", ["../x", "pve2/../../etc", "a b", "-pve2", "x" * 64])
def test_a_migration_source_that_is_not_a_node_name_is_refused(node, source):
    result = hook(node, "100", "pre-start", PVE_MIGRATED_FROM=source)
    assert result.returncode == ExitCode.USAGE and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "PVE_MIGRATED_FROM" in result.stderr and "is not a Proxmox node name" in result.stderr


# --- generated inputs (hypothesis, bounded) ------------------------------------------------------

FUZZ = hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# What makes Proxmox's split, QEMU's option syntax and the config file format trip.
_ARGS_WORDS = st.sampled_from([
    "-device", "-object", "-machine", "-netdev", "-chardev", "-numa", "-m", "--device", "-smbios", "\\", "\\ ", "'",
    '"', "'a b'", '"a\\"b"', "id=vhu-net1", "id=vhu-mem", "memory-backend=vhu-mem", "netdev=vhu-net3",
    "virtio-net-pci,id=vhu-net1", "memory-backend-memfd,id=vhu-mem,size=1024M,share=on", "e1000,addr=0x13",
    "type=1,serial=x", "{\"id\":\"vhu-net2\"}", " ", "\t", "\r", "\x0b", "\x0c", "\x1b", "\x1c", "\x7f", "\x85",
    "\xa0", "\udcff", "²", "vhu-", ",,", "=", "#", "0",
])
ARGS_LINES = st.lists(st.one_of(_ARGS_WORDS, st.text(max_size=6)), max_size=12).map("".join)
VM_WITH_NICS = VmSpec(100, (vhost_nic(1), vhost_nic(3)))


def _only_agent_errors(call):
    """`call()`, or None when it refused with the agent's error (anything else fails the test)."""
    try:
        return call()
    except AgentError:
        return None


def _user_words(line: str) -> list[str]:
    tokens = qemuargs.split_args(line)
    owned = qemuargs._owned_indices(tokens)
    return [t.text for i, t in enumerate(tokens) if i not in owned]


@FUZZ
@given(line=ARGS_LINES, running=st.booleans(), with_nics=st.booleans())
def test_any_args_line_is_refused_or_written_so_it_reads_back_as_planned(line, running, with_nics):
    config = VmConfig.parse(f"balloon: 0\nmemory: 1024\nargs: {line}\n")
    vm = VM_WITH_NICS if with_nics else VmSpec(100)
    plan = _only_agent_errors(lambda: plan_args(vm, config.effective(), (9, 2, 0), SOCKET_DIRS))
    sync = plan and _only_agent_errors(lambda: sync_args(config, plan, running))
    if not sync or sync.in_sync:
        return
    after = VmConfig.parse(sync.config_after.text)  # as the next reader sees the file
    written = after.effective().get("args", "")
    assert qemuargs.agent_args(written) == plan.args  # the agent's words once, whole, last
    before = config.effective().get("args", "")
    assert _user_words(written) == _user_words(before)  # every word of the user's kept, in order


SPEC_LINES = st.lists(st.one_of(
    st.sampled_from(["vhostuser: 100-net1", "vhostuser: 100-net2", "qinq: 100-net0", "vm: 100", "vhostuser: 1-net99",
                     "\tbridge brv", "\tmac 02:00:00:00:00:01", "\tmac 02:00:00:00:00:02", "\ttag 10", "\ttag ²",
                     "\ttrunks 1-4094", "\tqinq 5", "\tcvlans 10,20-22", "\tethertype 802.1q", "\tqueues 64",
                     "\tmtu 9710", "\tbackend external", "\tchain-hookscript local:snippets/a.sh", "", "#x", " ",
                     "\t", "\tbridge", "vhostuser:", "\ttag 4095", "\tqinq 0"]),
    st.text(max_size=12)), max_size=16).map("\n".join)


@FUZZ
@given(text=SPEC_LINES)
def test_any_spec_file_is_a_bad_spec_with_its_line_or_reads_back_the_same(text):
    try:
        spec = parse_spec(text, "100.cfg")
    except AgentError as err:
        assert err.exit_code == ExitCode.BAD_SPEC and "\n" not in str(err) and str(err).startswith("100.cfg")
        return
    assert parse_spec(format_spec(spec)) == spec


def _served_vm_config(lines: list[str]) -> str:
    """A VM the agent serves, then anything."""
    return "balloon: 0\nmemory: 1024\n" + "\n".join(lines)


CONFIG_LINES = st.lists(st.one_of(
    st.sampled_from(["memory: 0", "memory: 2048", "memory: ²", "memory: " + "9" * 5000, "balloon: 0", "balloon: 1",
                     "numa: 1", "hugepages: 2", "hotplug: memory", "virtiofs0: x", "template: 1", "lock: backup",
                     "net1: virtio=02:00:00:00:00:01,bridge=vmbr0", "net3: e1000=XX", "net99: virtio", "[PENDING]",
                     "delete: args", "[snap]", "vmstate: x", "machine: q35", "args: -numa node", "args: -device",
                     "args: '", "hookscript: local:snippets/pve-vhost-agent", "", "#description"]),
    st.builds("args: {}".format, ARGS_LINES), st.text(max_size=20)), max_size=12).map(_served_vm_config)


@FUZZ
@given(text=CONFIG_LINES, running=st.booleans())
def test_any_vm_config_parses_back_byte_for_byte_and_is_planned_or_that_vms_problem(text, running):
    config = VmConfig.parse(text)
    assert config.text == text
    enabled = config.with_value("hookscript", "local:snippets/pve-vhost-agent")
    state = NodeState(vms=(LocalVm(100, enabled), LocalVm(101, VmConfig.parse(ENABLED))),
                      running=frozenset({100} if running else ()),
                      spec=ClusterSpec((vhost_nic(1), vhost_nic(2, vmid=101))),
                      socket_dirs=SOCKET_DIRS, qemu_version=(9, 2, 0))
    plan = plan_node(state)
    assert not any(BUG in str(p) for p in plan.problems), plan.problems
    assert all(p.vmid == 100 for p in plan.problems)  # one VM's config is that VM's problem
    assert any(getattr(a, "vmid", None) == 101 for a in plan.actions)  # and the other VM is still served


@FUZZ
@given(data=st.binary(max_size=200) | st.lists(st.sampled_from(
    [b"dir: local", b"\tpath /var/lib/vz", b"nfs: \xff", b"\tpath \xe9", b"lvm: x", b"\t", b"path /x", b""]),
    max_size=8).map(b"\n".join))
def test_any_storage_cfg_bytes_are_read(data):
    storages = parse_storages(data.decode("utf-8", "surrogateescape"))
    assert all(isinstance(k, str) for k in storages) and storages["local"].path == "/var/lib/vz"


NASTY = st.one_of(st.sampled_from([
    "", " ", "-", "--", "0", "1", "100", "101", "4095", "²", "١٠٠", "1_00", "+1", "-1", "9" * 30, "1e3", "nan",
    "net0", "net1", "net31", "net32", "net" + "1" * 30, "eth0", "br0", "br 0", "br,id=x", "b" * 16,
    "02:00:00:00:00:09", "03:00:00:00:00:01", "00:00:00:00:00:00", "10,20-22", "20-10", "1;2", ",,", "802.1q",
    "ovs", "external", "local", "../x", "unix:/x", "ssl:x:1", "\udcff", "a\nb", "a\rb", "\x1b[2J", "--help",
]), st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8))


def _or_nasty(*valid: str) -> st.SearchStrategy:
    """Mostly values a user means, sometimes a hostile one."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), NASTY)


_VMID, _NIC = _or_nasty("100", "101", "200", "999"), _or_nasty("net0", "net1", "net2", "net5", "net31")
_VALUES = {
    "--bridge": _or_nasty("brv", "br-dpdk", "vmbr0"), "--mac": _or_nasty("02:00:00:00:00:09", "BC:24:11:00:00:02"),
    "--backend": _or_nasty("ovs", "external"), "--tag": _or_nasty("5", "10", "4094"),
    "--trunks": _or_nasty("10,20-22", "1-4094"), "--qinq": _or_nasty("5", "950"), "--cvlans": _or_nasty("10", "1-5"),
    "--ethertype": _or_nasty("802.1q", "802.1ad"), "--queues": _or_nasty("1", "4", "64"),
    "--rx-queue-size": _or_nasty("256", "1024"), "--tx-queue-size": _or_nasty("512"), "--mtu": _or_nasty("1500", "9000"),
    "--storage": _or_nasty("local", "nosuch"),
}
_FLAGS = ("--dry-run", "--json", "--no-vlan", "--all", "--patched-qinq")


def _option(name: str) -> st.SearchStrategy:
    """`[--flag]` or `[--option, value]` (named functions: hypothesis prints a lambda by its source)."""
    if name in _FLAGS:
        return st.just([name])
    return st.tuples(st.just(name), _VALUES[name]).map(list)


def _flat(parts) -> list[str]:
    return [word for part in parts for word in (part if isinstance(part, list) else [part])]


def _options(*names: str) -> st.SearchStrategy:
    return st.lists(st.sampled_from(names).flatmap(_option), max_size=3).map(_flat)


_VHOST = ("--bridge", "--mac", "--backend", "--tag", "--trunks", "--qinq", "--cvlans", "--ethertype", "--queues",
          "--rx-queue-size", "--tx-queue-size", "--mtu", "--dry-run", "--json")


def _command(words: list[str], *parts: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(st.just(words), *parts).map(_flat)


ARGVS = st.one_of(
    _command(["nic", "add"], _VMID, _NIC, _options(*_VHOST)),
    _command(["nic", "set"], _VMID, _NIC, _options(*_VHOST, "--no-vlan")),
    _command(["nic", "remove"], _VMID, _NIC, _options("--dry-run", "--json")),
    _command(["nic", "list"], st.lists(_VMID, max_size=1), _options("--json")),
    _command(["qinq", "set"], _VMID, _NIC, _option("--qinq"),
             _options("--cvlans", "--ethertype", "--dry-run")),
    _command(["qinq", "remove"], _VMID, _NIC, _options("--dry-run")),
    _command(["show"], _VMID, _options("--json")),
    _command(["apply"], st.lists(_VMID, max_size=1), _options("--all", "--dry-run")),
    _command(["enable"], _VMID, _options("--storage", "--dry-run")),
    _command(["disable"], _VMID, _options("--dry-run")),
    _command(["ovs", "status"], _VMID, _options("--json")),
    _command(["install-hook"], _options("--storage", "--dry-run")),
    _command(["adopt"], st.lists(_VMID, max_size=1), _options("--all", "--bridge", "--patched-qinq", "--dry-run",
                                                              "--json")),
    st.sampled_from([["status"], ["status", "--json"], ["migrate-spec"], ["nic"], ["frob"]]),
    st.lists(NASTY, max_size=4),
)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    """One node for the generated command lines (they may change it: every state is a fair start)."""
    root = tmp_path_factory.mktemp("fuzz-root")
    (root / "etc/pve/nodes/pve1/qemu-server").mkdir(parents=True)
    (root / "etc/pve/priv/lock").mkdir(parents=True)
    mark_pmxcfs(root / "etc/pve")
    pve = PveRoot(root)
    pve.write_vm(100, ENABLED)
    pve.write_vm(101, ROUTER + "net2: virtio=BC:24:11:00:00:02,bridge=vmbr0,tag=5\n")
    ok(pve, "nic", "add", "100", "net1", "--bridge", "brv")
    ok(pve, "apply", "100")
    return pve


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(argv=ARGVS)
def test_any_command_line_ends_in_a_result_or_one_line_never_a_bug(fuzz_root, argv):
    full = ["--root", str(fuzz_root.root), "--ovsdb", f"unix:{fuzz_root.root}/no-ovsdb.sock", "--node", "pve1", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = common.call(main.main, full)
    assert isinstance(code, int) and 0 <= code <= 130, code
    assert BUG not in err.getvalue() and TRACEBACK not in err.getvalue(), (argv, err.getvalue())
    if code not in (0, 130) and "--all" not in argv and "status" not in argv and "adopt" not in argv:
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("pve-vhost-agent: "), (argv, err.getvalue())
    assert not fuzz_root.settings().cluster_lock_dir.exists()


ENV_VALUES = st.one_of(st.none(), NASTY, st.sampled_from(["pve1", "pve2", "unix:/nonexistent/db.sock", "/", "x/y"]))


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(vmid=st.one_of(st.sampled_from(["100", "101", "999"]), NASTY),
       phase=st.one_of(st.sampled_from(["pre-start", "post-start", "pre-stop", "post-stop"]), NASTY),
       migrated=ENV_VALUES, ovsdb=ENV_VALUES, node=ENV_VALUES, extra=st.lists(NASTY, max_size=1))
def test_any_hook_call_and_environment_ends_in_an_exit_code_and_one_line(fuzz_root, vmid, phase, migrated, ovsdb,
                                                                           node, extra):
    env = {"PVE_VHOST_AGENT_ROOT": str(fuzz_root.root), "PVE_MIGRATED_FROM": migrated,
           "PVE_VHOST_AGENT_OVSDB": ovsdb, "PVE_VHOST_AGENT_NODE": node}
    env = {key: value for key, value in env.items() if value is not None}
    handlers = list(logging.getLogger().handlers)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = hookscript.main([vmid, phase, *extra], env)
    finally:
        logging.getLogger().handlers[:] = handlers  # a hook sets up its own logging
    assert isinstance(code, int) and 0 <= code <= 9
    assert BUG not in err.getvalue() + out.getvalue() and TRACEBACK not in err.getvalue()
    assert err.getvalue().count("\n") <= 1


# --- writers killed at any point, writers in parallel ------------------------------------------

# A writer that SIGKILLs itself at the n-th call of one file-system step, then the CLI.
KILLED_AT = """
import os, signal, sys
step, nth, count = sys.argv[1], int(sys.argv[2]), [0]
real = getattr(os, step)
def dying(*args, **kwargs):
    count[0] += 1
    if count[0] == nth:
        if step == "write":  # half of it on disk
            real(args[0], bytes(args[1])[:max(1, len(args[1]) // 2)])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, step, dying)
from pve_vhost_agent.cli.main import main
main(args=sys.argv[3:], prog_name="pve-vhost-agent")
"""
# Each write is: temp file written, fsync, rename; a `nic set` writes the spec file, then the args.
KILL_POINTS = [("write", 1), ("fsync", 1), ("replace", 1), ("write", 2), ("fsync", 2), ("replace", 2), ("rmdir", 1)]


def _no_leftovers(root) -> None:
    pve = root.root / "etc/pve"
    assert [p for p in pve.rglob("*") if ".tmp." in p.name] == []
    assert not root.settings().cluster_lock_dir.exists()


def _expire_cluster_lock(root) -> None:
    # pmxcfs drops a lock whose holder died after 120 s; a plain folder keeps it: do what pmxcfs does.
    with contextlib.suppress(FileNotFoundError):
        root.settings().cluster_lock_dir.rmdir()


def _converged(root, queues: int) -> None:
    assert ok(root, "nic", "list", "100").count(f"{queues} queues") == 1
    show = ok(root, "show", "100")
    assert "the VM config has exactly these args" in show, show
    assert f"queues={queues}" in root.vm_path(100).read_text()
    _no_leftovers(root)


@pytest.mark.parametrize("step, nth", KILL_POINTS, ids=[f"{s}-{n}" for s, n in KILL_POINTS])
def test_a_writer_killed_at_any_step_leaves_nothing_a_rerun_does_not_mend(node, step, nth):
    argv = ["--root", str(node.root), "--node", "pve1", "nic", "set", "100", "net1", "--queues", "4"]
    killed = subprocess.run(["/usr/bin/python3", "-c", KILLED_AT, step, str(nth), *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr  # it got to that step
    _expire_cluster_lock(node)
    rerun = node.cli(*argv[4:])
    assert rerun.returncode == 0, rerun.stderr
    _converged(node, 4)


@pytest.mark.slow
def test_writers_killed_at_random_moments_converge(node):
    rng = random.Random()
    for queues in (2, 4, 8, 2, 4, 8):
        writer = subprocess.Popen(["/usr/bin/python3", "-m", "pve_vhost_agent", "--root", str(node.root), "--node",
                                   "pve1", "nic", "set", "100", "net1", "--queues", str(queues)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.8))
        writer.kill()
        writer.wait()
        _expire_cluster_lock(node)
        rerun = node.cli("nic", "set", "100", "net1", "--queues", str(queues))
        assert rerun.returncode == 0, rerun.stderr
        _converged(node, queues)


@pytest.mark.slow
def test_parallel_declarations_all_land_in_the_spec_and_the_args(pve_root):
    pve_root.write_vm(101, ENABLED)
    ok(pve_root, "enable", "101")
    argv = ["/usr/bin/python3", "-m", "pve_vhost_agent", "--root", str(pve_root.root), "--node", "pve1"]
    nics = range(1, 21)
    writers = [subprocess.Popen(argv + ["nic", "add", "101", f"net{n}", "--bridge", "brv"], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in nics]
    results = [(w.wait(timeout=120), w.stderr.read()) for w in writers]
    for writer in writers:
        writer.stdout.close()
        writer.stderr.close()
    assert [code for code, _err in results] == [0] * len(writers), results
    listed = ok(pve_root, "nic", "list", "101")
    assert sorted(int(line.split()[1][3:-1]) for line in listed.splitlines()) == list(nics)  # `101 net7: ...`
    assert "the VM config has exactly these args" in ok(pve_root, "show", "101")  # the last args writer wrote them for all
    assert all(f"id=vhu-net{n}," in pve_root.vm_path(101).read_text() for n in nics)
    _no_leftovers(pve_root)


# --- a refused start leaves no Open vSwitch row -------------------------------------------------

REFUSED_STARTS = [
    # (what, change to VM 100's config text or spec, exit code)
    ("stale args", lambda root: _edit(root.vm_path(100), "memory: 1024", "memory: 2048"), ExitCode.STALE),
    ("a control character in stale args", lambda root: (_edit(root.vm_path(100), "args: ", f"args: {CONTROL} -x "),
                                                          _edit(root.vm_path(100), "memory: 1024", "memory: 2048")),
     ExitCode.STALE),
    ("no DPDK in ovs-vswitchd", lambda root: None, ExitCode.REFUSED),
    ("a swallowed agent option", lambda root: _edit(root.vm_path(100), "args: ", "args: -device "), ExitCode.CONFLICT),
    ("ballooning on", lambda root: _edit(root.vm_path(100), "balloon: 0\n", ""), ExitCode.REFUSED),
    ("memory 0", lambda root: _edit(root.vm_path(100), "memory: 1024", "memory: 0"), ExitCode.CONFLICT),
    ("a superscript tag in the spec", lambda root: _edit(root.spec_file(100), "\tmac ", "\ttag ²\n\tmac "),
     ExitCode.BAD_SPEC),
    ("a world-writable socket folder", lambda root: (root.root / "run/pve-vhost-agent/ovs").chmod(0o777),
     ExitCode.CONFLICT),
]


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("change, code", [r[1:] for r in REFUSED_STARTS], ids=[r[0] for r in REFUSED_STARTS])
def test_a_refused_start_writes_nothing_and_makes_no_ovs_row(pve_root, ovs, change, code):
    bridge = f"rb{uuid.uuid4().hex[:8]}"
    vmid = str(100)
    pve_root.write_vm(100, ROUTER)
    ok(pve_root, "nic", "add", vmid, "net1", "--bridge", bridge, "--mac", "02:00:00:00:00:01")
    ok(pve_root, "enable", vmid)
    with_ovs = {"PVE_VHOST_AGENT_OVSDB": ovs.remote}

    qemu.installed_version(cache_dir=pve_root.settings().run_dir)  # a hook keeps it: cached before the snapshot
    change(pve_root)
    before = pve_root.snapshot()
    result = hook(pve_root, vmid, "pre-start", **with_ovs)
    assert result.returncode == code, result
    assert TRACEBACK not in result.stdout + result.stderr and BUG not in result.stdout + result.stderr
    assert pve_root.snapshot() == before
    assert ovs.find("Bridge", f"name={bridge}") == []
    assert ovs.find("Port", f"external_ids:pve-vhost-agent\\:vmid={vmid}") == []
