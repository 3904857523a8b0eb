"""The Proxmox stand-in behaves as platform-facts.md says Proxmox does (real QEMU, real OVS)."""

import re
import shlex
import tempfile
import uuid
from pathlib import Path

import pytest

from pvestandin import (
    Cluster,
    MigrationFailed,
    NotModelled,
    Qm,
    StartAborted,
    StartFailed,
    cmdline,
    kill_leftovers,
    migrate,
    qemu,
    vmconfig,
)
from pvestandin.recording_hook import RecordingHook

from conftest import PEER, REPO

CFG2CMD = PEER / "qemu-server-cfg2cmd"


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="h5pv-standin-") as folder:
        yield Path(folder)


@pytest.fixture
def cluster(workdir):
    cluster = Cluster(workdir / "cluster", PEER / "qemu-server-readconfig")
    cluster.add_node("nodeA")
    cluster.add_node("nodeB")
    yield cluster
    kill_leftovers(cluster)


@pytest.fixture
def hook(workdir, cluster):
    recorder = RecordingHook(workdir / "hook")
    cluster.install_hookscript(recorder.script, "recorder.py")
    return recorder


def qm(cluster, node="nodeA"):
    return Qm(cluster, node, hook_timeout=60, start_timeout=30)


def write_conf(cluster, vmid, lines, node="nodeA", pending=()):
    text = "\n".join(["hookscript: local:snippets/recorder.py", "memory: 64", *lines]) + "\n"
    if pending:
        text += "\n[PENDING]\n" + "\n".join(pending) + "\n"
    return cluster.write_vm_config(node, vmid, text)


def qemu_processes_under(folder):
    """PIDs of live QEMU processes whose command line names a path under `folder`."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"qemu-system-x86_64") and any(str(folder).encode() in a for a in argv):
            if qemu.is_alive(int(proc.name)):
                pids.append(int(proc.name))
    return pids


def snippet(cluster, node, name):
    return str(cluster.nodes[node].path("/var/lib/vz/snippets") / name)


def test_start_and_stop_call_the_hook_as_proxmox_does(cluster, hook):
    write_conf(cluster, 100, [])
    node = qm(cluster)
    vm = node.start(100)
    assert qemu.qmp_command(vm.qmp, "query-status")["status"] == "prelaunch"
    assert vm.task.lines == ["hook pre-start ran on nodeA", "hook post-start ran on nodeA"]
    task = node.stop(100)
    assert task.lines == ["hook pre-stop ran on nodeA", "hook post-stop ran on nodeA"]
    assert not qemu.is_alive(vm.pid)
    assert not vm.qmp.exists() and not cluster.nodes["nodeA"].path("/run/qemu-server/100.pid").exists()

    calls = hook.calls()
    assert [c["argv"] for c in calls] == [
        [snippet(cluster, "nodeA", "recorder.py"), "100", phase]
        for phase in ("pre-start", "post-start", "pre-stop", "post-stop")
    ]
    assert {(c["stdin"], c["cwd"], c["LC_ALL"]) for c in calls} == {("", "/", "C")}
    # PVE_MIGRATED_FROM is set, empty, for a normal start; a stop does not set it.
    assert [c["PVE_MIGRATED_FROM"] for c in calls] == ["", "", None, None]
    # The VM config lock is held while the start/stop hooks run.
    assert all(c["lock_held"] for c in calls)


def test_pre_start_failure_aborts_the_start(cluster, hook):
    write_conf(cluster, 101, [])
    hook.fail("pre-start")
    with pytest.raises(StartAborted) as caught:
        qm(cluster).start(101)
    script = snippet(cluster, "nodeA", "recorder.py")
    assert str(caught.value) == (
        f"hookscript error for 101 on pre-start: command '{script} 101 pre-start' failed: exit code 1"
    )
    assert caught.value.task.lines[:2] == ["hook pre-start ran on nodeA", "hook: failing pre-start as told"]
    assert hook.phases() == ["pre-start"]
    run = cluster.nodes["nodeA"].path("/run/qemu-server")
    assert sorted(p.name for p in run.iterdir()) == []  # no QEMU pidfile, socket or cleanup flag


def test_pending_memory_is_applied_before_pre_start(cluster, hook):
    path = write_conf(cluster, 102, ["balloon: 0"], pending=["memory: 96", "delete: balloon"])
    vm = qm(cluster).start(102)
    seen = vmconfig.parse(hook.calls()[0]["confs"]["nodeA"])
    assert not seen.has_pending() and seen.main["memory"] == "96" and "balloon" not in seen.main
    assert vmconfig.load(path).main == seen.main
    assert vm.argv[vm.argv.index("-m") + 1] == "96"
    summary = qemu.qmp_command(vm.qmp, "query-memory-size-summary")
    assert summary["base-memory"] == 96 * 1024 * 1024
    devices = {d["name"] for d in qemu.qmp_command(vm.qmp, "qom-list", path="/machine/peripheral")}
    assert "balloon0" in devices


def test_pending_is_kept_for_later_on_a_resume_from_hibernation(cluster, hook):
    """vm_start_nolock: `if (!$statefile && !$resume && ...pending...)`; resume = vmstate or lock suspended."""
    path = write_conf(cluster, 105, ["balloon: 0", "lock: suspended"], pending=["memory: 96"])
    vm = qm(cluster).start(105)
    seen = vmconfig.parse(hook.calls()[0]["confs"]["nodeA"])
    assert seen.pending == {"memory": "96"} and vmconfig.load(path).pending == {"memory": "96"}
    assert vm.argv[vm.argv.index("-m") + 1] != "96"


def test_args_come_last_split_like_a_shell_without_expansion(cluster, hook):
    args = "-device virtio-rng-pci,id=rng7 -smbios 'type=1,product=$HOME and \"quotes\"'"
    write_conf(cluster, 103, [f"args: {args}", "net0: virtio=02:00:00:00:01:03"])
    vm = qm(cluster).start(103)
    split = ["-device", "virtio-rng-pci,id=rng7", "-smbios", 'type=1,product=$HOME and "quotes"']
    assert list(vm.argv[-5:]) == [*split, "-S"]  # -S (paused) is the start's, after args
    assert vm.argv.index("-netdev") < len(vm.argv) - 5
    devices = {d["name"] for d in qemu.qmp_command(vm.qmp, "qom-list", path="/machine/peripheral")}
    assert {"rng7", "net0", "balloon0", "pci.1", "pci.2"} <= devices


def test_hookscript_is_resolved_at_every_call(cluster, hook, workdir):
    path = write_conf(cluster, 104, [])
    node = qm(cluster)
    node.start(104)
    # Replace the script on disk and re-point the config: the next calls use what is there now.
    other = RecordingHook(workdir / "other")
    cluster.install_hookscript(other.script, "other.py")
    path.write_text(path.read_text().replace("recorder.py", "other.py"))
    snippets = cluster.nodes["nodeA"].path("/var/lib/vz/snippets")
    (snippets / "other.py").chmod(0o644)
    task = node.stop(104)
    assert task.lines == [
        f"hookscript error for 104 on {phase}: script 'local:snippets/other.py' is not executable"
        for phase in ("pre-stop", "post-stop")
    ]
    assert other.calls() == [] and hook.phases() == ["pre-start", "post-start"]

    (snippets / "other.py").chmod(0o755)
    node.start(104)
    assert other.phases() == ["pre-start", "post-start"]
    node.stop(104)
    (snippets / "other.py").unlink()
    with pytest.raises(StartAborted, match=r"^hookscript error for 104 on pre-start: script 'local:snippets/other.py' does not exist$"):
        node.start(104)
    path.write_text(path.read_text().replace("local:snippets/other.py", "local:iso/recorder.py"))
    with pytest.raises(StartAborted, match=r"'local:iso/recorder.py' is not in the snippets directory$"):
        node.start(104)
    assert not list(cluster.nodes["nodeA"].path("/run/qemu-server").glob("*.pid"))


def test_failed_qemu_start_runs_no_further_hook(cluster, hook):
    write_conf(cluster, 105, ["args: -device no-such-device,id=x"])
    with pytest.raises(StartFailed, match="QEMU exited with code 1"):
        qm(cluster).start(105)
    assert hook.phases() == ["pre-start"]
    assert qemu_processes_under(cluster.base) == []
    assert not cluster.nodes["nodeA"].path("/run/qemu-server/105.cleanup").exists()


@pytest.mark.parametrize("end", ["crash", "shutdown_from_guest"])
def test_vm_ending_by_itself_runs_post_stop_without_pre_stop(cluster, hook, end):
    write_conf(cluster, 106, [])
    node = qm(cluster)
    vm = node.start(106)
    task = getattr(node, end)(106)
    assert not qemu.is_alive(vm.pid)
    assert hook.phases() == ["pre-start", "post-start", "post-stop"]
    assert task.lines == ["hook post-stop ran on nodeA"]
    # post-stop runs once per QEMU run: a second cleanup runs nothing.
    assert node.qm_cleanup(106, clean=True).lines == []


def test_migration_runs_start_hooks_on_the_target_with_the_config_still_at_the_source(cluster, hook):
    write_conf(cluster, 107, ["numa: 1", "sockets: 2", "hugepages: 2"])
    source, target = qm(cluster, "nodeA"), qm(cluster, "nodeB")
    old = source.start(107)
    vm = migrate(source, target, 107)

    assert not qemu.is_alive(old.pid) and qemu.is_alive(vm.pid)
    assert qemu.qmp_command(vm.qmp, "query-status")["status"] == "prelaunch"  # as the source was
    calls = hook.calls()
    assert [(c["phase"], c["node"], c["PVE_MIGRATED_FROM"]) for c in calls] == [
        ("pre-start", "nodeA", ""), ("post-start", "nodeA", ""),
        ("pre-start", "nodeB", "nodeA"), ("post-start", "nodeB", "nodeA"),
    ]
    assert calls[2]["argv"] == [snippet(cluster, "nodeB", "recorder.py"), "107", "pre-start"]
    assert list(calls[2]["confs"]) == ["nodeA"]  # during the target's pre-start
    assert "lock: migrate" in calls[2]["confs"]["nodeA"].splitlines()  # the target starts with --skiplock
    assert calls[2]["locks_held"] == ["nodeA", "nodeB"]  # the source's lock for the whole migration
    assert not cluster.nodes["nodeA"].vm_conf(107).exists()
    assert "lock:" not in cluster.nodes["nodeB"].vm_conf(107).read_text()  # `qm unlock` on the target
    assert not any(line.startswith("migration listens on") for line in vm.task.lines)

    target.stop(107)
    assert hook.phases()[4:] == ["pre-stop", "post-stop"]
    assert hook.calls()[4]["node"] == "nodeB"


def test_a_running_vm_keeps_running_after_migration(cluster, hook):
    write_conf(cluster, 112, [])
    source = Qm(cluster, "nodeA", paused=False, hook_timeout=60)
    target = Qm(cluster, "nodeB", paused=False, hook_timeout=60)
    source.start(112)
    vm = migrate(source, target, 112)
    assert qemu.qmp_command(vm.qmp, "query-status")["status"] == "running"
    assert source.pid(112) is None
    assert hook.phases() == ["pre-start", "post-start", "pre-start", "post-start"]


def test_a_migration_listens_line_from_a_hook_breaks_the_migration(cluster, hook):
    write_conf(cluster, 108, [])
    source, target = qm(cluster, "nodeA"), qm(cluster, "nodeB")
    old = source.start(108)
    hook.say("pre-start", "migration listens on unix:/run/qemu-server/108.migrate\n")
    with pytest.raises(MigrationFailed, match="stray line"):
        migrate(source, target, 108)
    assert qemu.is_alive(old.pid)
    assert "lock:" not in cluster.nodes["nodeA"].vm_conf(108).read_text()  # phase1_cleanup
    assert target.pid(108) is None


def test_q35_vm_runs_with_proxmox_readconfig_and_nic_slot_on_pci1(cluster, hook):
    write_conf(cluster, 109, ["machine: q35", "net6: virtio=02:00:00:00:01:09"])
    vm = qm(cluster).start(109)
    readconfig = vm.argv[vm.argv.index("-readconfig") + 1]
    assert readconfig == str(cluster.nodes["nodeA"].path("/usr/share/qemu-server/pve-q35-4.0.cfg"))
    assert "virtio-net-pci,mac=02:00:00:00:01:09,netdev=net6,bus=pci.1,addr=0x1,id=net6" in vm.argv[
        vm.argv.index("-device", vm.argv.index("-netdev")) + 1]
    devices = {d["name"] for d in qemu.qmp_command(vm.qmp, "qom-list", path="/machine/peripheral")}
    assert {"net6", "balloon0"} <= devices


@pytest.fixture
def ovs_cluster(workdir, ovs):
    cluster = Cluster(workdir / "cluster", PEER / "qemu-server-readconfig")
    cluster.add_node("nodeA", netns=ovs.netns, ovsdb=ovs.remote)
    yield cluster
    kill_leftovers(cluster)


def port_vlan(ovs, name: str) -> dict:
    """tag, trunks, vlan_mode of Port `name` ({} when there is no such port)."""
    if not ovs.find("Port", f"name={name}"):
        return {}
    return ovs.get("Port", name, "tag", "trunks", "vlan_mode")


def test_taps_are_plugged_into_ovs_with_proxmox_vlan_settings(ovs_cluster, ovs, workdir):
    bridge = f"h5pvbr{uuid.uuid4().hex[:6]}"
    ovs.vsctl("add-br", bridge, "--", "set", "Bridge", bridge, "datapath_type=netdev")
    hook = RecordingHook(workdir / "hook")
    ovs_cluster.install_hookscript(hook.script, "recorder.py")
    write_conf(ovs_cluster, 110, [
        f"net0: virtio=02:00:00:00:10:00,bridge={bridge},tag=10,trunks=20;30-31",
        f"net1: virtio=02:00:00:00:10:01,bridge={bridge},tag=5",
        f"net2: e1000=02:00:00:00:10:02,bridge={bridge},trunks=40",
    ])
    # A stale port of the same name is deleted and re-added, as pve-common does.
    ovs.vsctl("add-port", bridge, "tap110i0", "tag=99")
    node = qm(ovs_cluster)
    node.start(110)
    assert port_vlan(ovs, "tap110i0") == {"tag": 10, "trunks": [20, 30, 31], "vlan_mode": "native-untagged"}
    assert port_vlan(ovs, "tap110i1") == {"tag": 5, "trunks": [], "vlan_mode": []}
    assert port_vlan(ovs, "tap110i2") == {"tag": [], "trunks": 40, "vlan_mode": []}  # a one-item set reads as its item
    for i in range(3):  # a real tap that ovs-vswitchd opened, not a stale row
        iface = ovs.get("Interface", f"tap110i{i}", "error", "ofport")
        assert iface["error"] == [] and iface["ofport"] > 0
    node.stop(110)  # QEMU's downscript unplugs
    assert [port_vlan(ovs, f"tap110i{i}") for i in range(3)] == [{}, {}, {}]

    node.start(110)
    node.crash(110)  # no downscript; qmeventd's cleanup unplugs
    assert [port_vlan(ovs, f"tap110i{i}") for i in range(3)] == [{}, {}, {}]
    ovs.vsctl("del-br", bridge)
    assert hook.phases() == ["pre-start", "post-start", "pre-stop", "post-stop", "pre-start", "post-start", "post-stop"]
    # Run inside the node's network namespace, the hook still gets Proxmox's argv and stdin.
    first = hook.calls()[0]
    assert (first["argv"], first["stdin"], first["LC_ALL"]) == (
        [snippet(ovs_cluster, "nodeA", "recorder.py"), "110", "pre-start"], "", "C")


def test_missing_bridge_fails_the_start_like_proxmox(ovs_cluster, workdir):
    hook = RecordingHook(workdir / "hook")
    ovs_cluster.install_hookscript(hook.script, "recorder.py")
    write_conf(ovs_cluster, 111, ["net0: virtio=02:00:00:00:11:00,bridge=h5pvnone"])
    with pytest.raises(StartFailed, match="^bridge 'h5pvnone' does not exist$"):
        qm(ovs_cluster).start(111)
    assert hook.phases() == ["pre-start"]


# --- the command line against Proxmox's own cfg2cmd corpus ------------------------------


def proxmox_facts(conf_text: str) -> cmdline.HostFacts:
    """The facts qemu-server's cfg2cmd test harness mocks (vhost-net on, bridge MTU 1500)."""
    version = re.search(r"^# QEMU_VERSION:\s*(\S+)", conf_text, re.M)
    return cmdline.HostFacts(
        qemu_version=version.group(1) if version else "11.0.0",  # the harness's QEMU
        vhost_net=True,
        bridge_mtu=lambda bridge: 1450 if bridge == "vxlan_bridge" else 1500,
    )


def modelled_parts(argv: list[str]) -> list[tuple[str, str]]:
    """The options the stand-in builds: memory, NUMA, NICs, balloon, i440fx bridges, q35 config."""
    parts = []
    for option, value in zip(argv, argv[1:]):
        if option in ("-m", "-numa", "-netdev", "-readconfig") or (
            option == "-object" and value.startswith("memory-backend")
        ) or (option == "-device" and (
            value.startswith(("pci-bridge,id=pci.1,", "pci-bridge,id=pci.2,", "virtio-balloon-pci"))
            or ",netdev=net" in value
        )):
            parts.append((option, value))
    return parts


def proxmox_command(name: str) -> list[str]:
    return shlex.split((CFG2CMD / f"{name}.cmd").read_text().replace("\\\n", " "))


def standin_command(name: str) -> list[str]:
    text = (CFG2CMD / name).read_text()
    return cmdline.config_to_command(8006, vmconfig.parse(text).main, proxmox_facts(text)).argv


@pytest.mark.parametrize("name", [
    "netdev.conf",  # pinned 5.0: host_mtu only when not 1500, no queue sizes
    "netdev-7.1-multiqueues.conf",  # queues: vectors, mq, packed
    "netdev_vxlan.conf",  # bridge MTU from the host
    "simple1.conf",  # current machine: queue sizes, host_mtu, host_tunnel=off, balloon reporting
    "memory-hugepages-2m.conf",  # NUMA per socket on a hugetlbfs file backend, share=on
    "memory-hugepages-1g.conf",
    "q35-simple.conf",  # -readconfig, no pci-bridge devices of its own
    "bootorder.conf",  # boot order=... gives NIC bootindex
])
def test_command_line_matches_proxmox(name):
    expected = modelled_parts(proxmox_command(name))
    assert any(option in ("-netdev", "-numa") for option, _ in expected)  # the config exercises something
    assert modelled_parts(standin_command(name)) == expected


def test_whole_cfg2cmd_corpus_matches_or_is_declared_not_modelled():
    matched, not_modelled, differ = [], set(), []
    for conf in sorted(CFG2CMD.glob("*.conf")):
        if not (CFG2CMD / f"{conf.name}.cmd").exists():
            continue  # Proxmox rejects these configs
        try:
            ours = modelled_parts(standin_command(conf.name))
        except NotModelled:
            not_modelled.add(conf.name)
            continue
        (matched if ours == modelled_parts(proxmox_command(conf.name)) else differ).append(conf.name)
    assert differ == []
    assert not_modelled == {
        # Windows VMs without a pinned machine are pinned to 5.1 by Proxmox
        "cpu-level.conf", "custom-cpu-model-host-phys-bits.conf", "custom-cpu-model.conf",
        "i440fx-win10-hostpci.conf", "q35-win10-hostpci.conf", "q35-windows-pinning.conf",
        "startdate-win11.conf",
        "memory-hotplug.conf", "memory-hotplug-hugepages.conf",  # DIMMs: the agent refuses them
        "efi-raw-template.conf", "q35-linux-hostpci-template.conf", "simple1-template.conf",
    }
    assert len(matched) >= 80


JOURNAL_HOOK = """#!/usr/bin/python3
import logging, sys
sys.path.insert(0, {repo!r})
from pve_vhost_agent.adapters.journal import context_logger, setup_logging
setup_logging(journal=True, human_stream=sys.stdout)
log = context_logger(logging.getLogger("pve_vhost_agent.flows.hook"), vmid=int(sys.argv[1]), phase=sys.argv[2])
log.info("phase %s", sys.argv[2])
"""


def test_hooks_on_a_node_log_into_a_private_journald(workdir, journald):
    cluster = Cluster(workdir / "cluster", PEER / "qemu-server-readconfig")
    cluster.add_node("nodeA", mount_ns=journald.mount_ns)
    script = workdir / "journal-hook"
    script.write_text(JOURNAL_HOOK.format(repo=str(REPO)))
    cluster.install_hookscript(script)
    vmid = 200_000 + uuid.uuid4().int % 700_000_000  # unique in the session's journal
    cluster.write_vm_config("nodeA", vmid, "hookscript: local:snippets/journal-hook\nmemory: 64\n")
    try:
        node = qm(cluster)
        started = node.start(vmid)
        stopped = node.stop(vmid)
    finally:
        kill_leftovers(cluster)
    phases = ["pre-start", "post-start", "pre-stop", "post-stop"]
    assert started.task.lines + stopped.lines == [f"phase {p}" for p in phases]
    entries = journald.entries("SYSLOG_IDENTIFIER=pve-vhost-agent", f"VMID={vmid}", count=4)
    assert [(e["PHASE"], e["MESSAGE"], e["PRIORITY"]) for e in entries] == [(p, f"phase {p}", "6") for p in phases]


def test_a_start_blocked_on_a_vhost_user_socket_times_out_without_leftovers(cluster, hook, workdir):
    sock = workdir / "vhu.sock"
    write_conf(cluster, 113, ["balloon: 0", (
        f"args: -object memory-backend-memfd,id=mem,size=64M,share=on -machine memory-backend=mem"
        f" -chardev socket,id=vhu0,path={sock},server=on,wait=off"
        f" -netdev type=vhost-user,id=vhu0,chardev=vhu0 -device virtio-net-pci,netdev=vhu0,id=vhu0"
    )])
    node = Qm(cluster, "nodeA", start_timeout=2, hook_timeout=60)
    with pytest.raises(StartFailed, match="QEMU did not start within 2 s"):
        node.start(113)
    assert hook.phases() == ["pre-start"]
    assert qemu_processes_under(cluster.base) == []
    assert not cluster.nodes["nodeA"].path("/run/qemu-server/113.cleanup").exists()
