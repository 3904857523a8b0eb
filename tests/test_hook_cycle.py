"""The hookscript through a faithful Proxmox stand-in: real QEMU, real OVS-DPDK, real journald.

A VM with a vhost-user NIC (backend ovs) and QinQ on its Proxmox tap NIC is enabled with
the CLI, then started, stopped, crashed and started stale, exactly as Proxmox would do it
(tests/pvestandin). The hookscript is the repository's own, installed by `enable`.
"""

import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from pvestandin import Cluster, Qm, StartAborted, TaskLog, kill_leftovers, qemu
from pvestandin.hooks import exec_hookscript, start_environment

from conftest import PEER, REPO
from fixtures.vhost_user_stub import VhostUserStub

MIGRATION_LINE = "migration listens on"


class Harness:
    """One stand-in node whose QEMU and hooks run in OVS-DPDK's netns and journald's mount ns."""

    def __init__(self, workdir: Path, ovs, journald):
        self.ovs, self.journald = ovs, journald
        self.cluster = Cluster(workdir / "cluster", PEER / "qemu-server-readconfig")
        self.node = self.cluster.add_node("nodeA", netns=ovs.netns, ovsdb=ovs.remote, mount_ns=journald.mount_ns)
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "PVE_VHOST_AGENT_ROOT": str(self.node.root),
                    "PVE_VHOST_AGENT_NODE": "nodeA", "PVE_VHOST_AGENT_OVSDB": ovs.remote}
        tag = uuid.uuid4().hex[:6]
        self.vmid = 100_000 + uuid.uuid4().int % 800_000  # unique in the session's journal
        self.tap_bridge, self.vhost_bridge = f"hct{tag}", f"hcv{tag}"
        ovs.vsctl("add-br", self.tap_bridge, "--", "set", "Bridge", self.tap_bridge, "datapath_type=netdev")

    def qm(self, **env) -> Qm:
        return Qm(self.cluster, "nodeA", env={**self.env, **env}, hook_timeout=60, start_timeout=30)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["/usr/bin/python3", "-m", "pve_vhost_agent", *args], env=self.env,
                                capture_output=True, text=True, timeout=60)
        assert not check or result.returncode == 0, result.stderr
        return result

    def write_vm(self, memory: int = 128) -> None:
        self.cluster.write_vm_config("nodeA", self.vmid, (
            f"balloon: 0\nmemory: {memory}\nname: router\n"
            f"net0: virtio=BC:24:11:00:00:01,bridge={self.tap_bridge},tag=950\n"))

    def declare_and_enable(self) -> None:
        self.write_vm()
        self.cli("nic", "add", str(self.vmid), "net1", "--bridge", self.vhost_bridge, "--tag", "10")
        self.cli("qinq", "set", str(self.vmid), "net0", "--qinq", "950", "--cvlans", "10,20")
        self.cli("enable", str(self.vmid))

    def enable_chaining(self, script: str) -> subprocess.CompletedProcess:
        """The VM with its own hookscript `script` (local:snippets/old-hook.sh) and a vhost-user
        NIC, enabled: the agent's hookscript chains the old one. `enable`'s result."""
        old = self.node.path("/var/lib/vz/snippets/old-hook.sh")
        old.write_text(script)
        old.chmod(0o755)
        self.write_vm()
        path = self.node.vm_conf(self.vmid)
        path.write_text(path.read_text() + "hookscript: local:snippets/old-hook.sh\n")
        self.cli("nic", "add", str(self.vmid), "net1", "--bridge", self.vhost_bridge)
        return self.cli("enable", str(self.vmid))

    def hook(self, phase: str, migrated_from: str | None = None, **env) -> subprocess.CompletedProcess:
        """Call the VM's hookscript exactly as Proxmox does, outside a start."""
        conf = dict(line.split(": ", 1) for line in self.node.vm_conf(self.vmid).read_text().splitlines() if ": " in line)
        task = TaskLog()
        run = exec_hookscript(root=self.node.root, conf=conf, vmid=self.vmid, phase=phase,
                              env=start_environment({**self.env, **env}, migrated_from), task=task,
                              enter=self.node.enter())
        return run

    @property
    def vhost_port(self) -> str:
        return f"vhu{self.vmid}i1"

    @property
    def tap(self) -> str:
        return f"tap{self.vmid}i0"

    @property
    def socket(self) -> Path:
        return self.node.path("/run/pve-vhost-agent/ovs") / f"vm-{self.vmid}-1.sock"

    def owned_ports(self) -> list[str]:
        return self.ovs.find("Port", f"external_ids:pve-vhost-agent\\:vmid={self.vmid}")

    def stop(self) -> None:
        kill_leftovers(self.cluster)
        for port in self.owned_ports():
            self.ovs.vsctl("--if-exists", "del-port", port)
        for bridge in (self.tap_bridge, self.vhost_bridge):
            self.ovs.vsctl("--if-exists", "del-br", bridge)


@pytest.fixture
def harness(ovs_dpdk, journald):
    with tempfile.TemporaryDirectory(prefix="pva-cycle-") as workdir:
        h = Harness(Path(workdir), ovs_dpdk, journald)
        try:
            yield h
        finally:
            h.stop()


def chardev_connected(vm, chardev: str) -> bool:
    for dev in qemu.qmp_command(vm.qmp, "query-chardev"):
        if dev["label"] == chardev:
            return not dev["filename"].startswith("disconnected:")
    raise AssertionError(f"QEMU has no chardev {chardev}")


def test_full_cycle_leaves_nothing_behind_and_tells_the_story(harness):
    h = harness
    h.declare_and_enable()
    config_before = h.node.vm_conf(h.vmid).read_text()
    vm = h.qm().start(h.vmid)
    task = vm.task.text
    # The hook never writes its own VM's config (Proxmox holds its lock during pre-start).
    assert h.node.vm_conf(h.vmid).read_text() == config_before

    # pre-start made the vhost-user port: QEMU (the socket server) got past its netdev.
    iface = h.ovs.get("Interface", h.vhost_port, "type", "options")
    assert iface["type"] == "dpdkvhostuserclient"
    assert iface["options"]["vhost-server-path"] == str(h.socket)
    assert chardev_connected(vm, "vhu-net1")
    assert h.ovs.get("Port", h.vhost_port, "tag")["tag"] == 10
    # post-start put QinQ on Proxmox's tap port (plugged by pve-bridge after pre-start).
    tap = h.ovs.get("Port", h.tap, "vlan_mode", "tag", "cvlans", "external_ids")
    assert (tap["vlan_mode"], tap["tag"], sorted(tap["cvlans"])) == ("dot1q-tunnel", 950, [10, 20])
    assert tap["external_ids"]["pve-vhost-agent:vmid"] == str(h.vmid)
    assert "ERROR" not in task and not any(line.startswith(MIGRATION_LINE) for line in vm.task.lines)

    # A second pre-start (e.g. a retried start) changes nothing.
    before = {p: h.ovs.get("Port", p, "vlan_mode", "tag", "external_ids", "interfaces") for p in (h.vhost_port, h.tap)}
    again = h.hook("pre-start")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Open vSwitch already as planned" in again.stdout
    assert {p: h.ovs.get("Port", p, "vlan_mode", "tag", "external_ids", "interfaces") for p in before} == before

    stop_task = h.qm().stop(h.vmid)
    assert h.owned_ports() == [] and h.ovs.find("Port", f"name={h.vhost_port}") == []
    assert h.ovs.find("Port", f"name={h.tap}") == []
    assert not h.socket.exists()
    assert not qemu.is_alive(vm.pid)
    assert "ERROR" not in stop_task.text

    entries = h.journald.entries("SYSLOG_IDENTIFIER=pve-vhost-agent", f"VMID={h.vmid}", count=6, timeout=10)
    phases = {e.get("PHASE") for e in entries}
    assert {"pre-start", "post-start", "pre-stop", "post-stop"} <= phases
    actions = {(e.get("ACTION"), e.get("PORT")) for e in entries}
    assert ("AddVhostPort", h.vhost_port) in actions and ("SetTapQinQ", h.tap) in actions
    assert ("DelPort", h.vhost_port) in actions
    timed = [e for e in entries if e.get("ACTION") in ("AddVhostPort", "SetTapQinQ", "DelPort")]
    assert timed and all(e["RESULT"] == "done" and e["DURATION_MS"].isdigit() for e in timed)


def test_stale_args_abort_the_start_with_the_fixing_command(harness):
    h = harness
    h.declare_and_enable()
    path = h.node.vm_conf(h.vmid)
    path.write_text(path.read_text().replace("memory: 128", "memory: 192"))
    with pytest.raises(StartAborted) as caught:
        h.qm().start(h.vmid)
    log = caught.value.task.text
    assert "memory changed from 128 to 192 MiB since the args were written" in log
    assert f"pve-vhost-agent apply {h.vmid}" in log
    assert h.owned_ports() == []  # refused before touching OVS
    h.cli("apply", str(h.vmid))
    vm = h.qm().start(h.vmid)
    assert chardev_connected(vm, "vhu-net1")


def test_pending_memory_is_planned_before_the_start_that_applies_it(harness):
    h = harness
    h.declare_and_enable()
    path = h.node.vm_conf(h.vmid)
    path.write_text(path.read_text() + "\n[PENDING]\nmemory: 160\n")
    h.cli("apply", str(h.vmid))  # the VM is stopped: the next start uses the pending memory
    vm = h.qm().start(h.vmid)
    assert vm.argv[vm.argv.index("-m") + 1] == "160"
    assert "memory-backend-memfd,id=vhu-mem,size=160M,share=on" in vm.argv


def test_crash_runs_no_pre_stop_and_post_stop_cleans_up(harness):
    h = harness
    h.declare_and_enable()
    h.qm().start(h.vmid)
    assert h.vhost_port in h.owned_ports()
    task = h.qm().crash(h.vmid)
    assert [run.phase for run in task.hooks] == ["post-stop"]
    assert h.owned_ports() == [] and not h.socket.exists()


def test_migration_start_reads_the_config_from_the_source_node(harness):
    h = harness
    h.declare_and_enable()
    # "nodeB" shares nodeA's folders here (one machine); only its name differs.
    as_b = {"PVE_VHOST_AGENT_NODE": "nodeB"}
    lost = h.hook("pre-start", **as_b)
    assert lost.returncode == 5 and "has a spec but no config" in lost.stdout
    migrating = h.hook("pre-start", migrated_from="nodeA", **as_b)
    assert migrating.returncode == 0, migrating.stdout
    assert h.vhost_port in h.owned_ports()


def test_ovs_down_aborts_pre_start_and_only_warns_at_post_stop(harness):
    h = harness
    h.declare_and_enable()
    down = {"PVE_VHOST_AGENT_OVSDB": f"unix:{h.node.root}/no-ovsdb.sock"}
    with pytest.raises(StartAborted) as caught:
        h.qm(**down).start(h.vmid)
    assert "cannot reach OVSDB" in caught.value.task.text
    h.qm().start(h.vmid)
    post = h.hook("post-stop", **down)
    assert post.returncode == 0
    assert "WARN:" in post.stdout and "cannot reach OVSDB" in post.stdout
    assert h.vhost_port in h.owned_ports()  # left for the service to clean


def test_a_failing_chained_hookscript_aborts_the_start_and_undoes_pre_start(harness):
    h = harness
    enabled = h.enable_chaining('#!/bin/sh\necho "old hook $1 $2 from=$PVE_MIGRATED_FROM"\n[ "$2" != pre-start ]\n')
    assert "local:snippets/old-hook.sh will run after the agent's" in enabled.stdout
    with pytest.raises(StartAborted) as caught:
        h.qm().start(h.vmid)
    assert f"old hook {h.vmid} pre-start from=" in caught.value.task.text
    assert h.owned_ports() == []
    disabled = h.cli("disable", str(h.vmid))
    assert "hookscript back to local:snippets/old-hook.sh" in disabled.stdout
    text = h.node.vm_conf(h.vmid).read_text()
    assert "hookscript: local:snippets/old-hook.sh" in text and "vhu-" not in text


BROKEN_CHAINED = [
    ("gone", lambda path: path.unlink(), "is missing"),
    ("not executable", lambda path: path.chmod(0o644), "is not executable"),
    ("without a #! line", lambda path: path.write_text("echo old hook\n"), "has no `#!` line"),
]


@pytest.mark.parametrize("breaks, words", [b[1:] for b in BROKEN_CHAINED], ids=[b[0] for b in BROKEN_CHAINED])
def test_a_chained_hookscript_that_cannot_run_aborts_the_start_and_undoes_pre_start(harness, breaks, words):
    # pre-start aborted but left the OVS port it had made.
    h = harness
    h.enable_chaining("#!/bin/sh\necho old hook\n")
    breaks(h.node.path("/var/lib/vz/snippets/old-hook.sh"))
    with pytest.raises(StartAborted) as caught:
        h.qm().start(h.vmid)
    task = caught.value.task.text
    assert "start aborted by the chained hookscript local:snippets/old-hook.sh" in task and words in task, task
    assert "Traceback" not in task
    assert h.owned_ports() == []


# --- QinQ on the tap must hold, or the VM does not start -----------------------------------

CANNOT_HOLD = [
    ("firewall on after qinq set", ",tag=950", ",tag=950,firewall=1", "has firewall=1"),
    ("tag changed after qinq set", ",tag=950", ",tag=20", "needs tag=950 (the S-tag) and no trunks"),
    ("bridge not in OVS", "bridge=hct", "bridge=hcgone", "Open vSwitch has no bridge hcgone"),
]


@pytest.mark.parametrize("old, new, words", [r[1:] for r in CANNOT_HOLD], ids=[r[0] for r in CANNOT_HOLD])
def test_a_tap_qinq_that_cannot_hold_aborts_the_start_before_ovs_is_touched(harness, old, new, words):
    h = harness
    h.declare_and_enable()
    path = h.node.vm_conf(h.vmid)
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(StartAborted) as caught:
        h.qm().start(h.vmid)
    errors = [line for line in caught.value.task.lines if line.startswith("ERROR: ")]
    assert len(errors) == 1 and "start aborted" in errors[0] and words in errors[0], caught.value.task.text
    assert h.owned_ports() == [] and h.ovs.find("Port", f"name={h.tap}") == []


def test_post_start_warns_about_an_uplink_too_small_for_the_s_tag(harness):
    h = harness
    uplink = f"h12qs{h.tap_bridge[3:]}"
    h.ovs.ip("link", "add", uplink, "mtu", "1500", "type", "veth", "peer", "name", f"{uplink}p")
    try:
        h.ovs.ip("link", "set", uplink, "up")
        h.ovs.vsctl("add-port", h.tap_bridge, uplink)
        h.declare_and_enable()
        vm = h.qm().start(h.vmid)
        warned = [line for line in vm.task.lines if f"uplink {uplink} " in line]
        assert len(warned) == 1 and warned[0].startswith("WARN: "), vm.task.text
        assert f"has MTU 1500, but QinQ frames from {h.tap} (MTU 1500) need 1504" in warned[0]
        assert f"set `mtu 1504` on {uplink} in /etc/network/interfaces" in warned[0]
        # Only a warning: the VM runs and its tap is QinQ.
        assert h.ovs.get("Port", h.tap, "vlan_mode")["vlan_mode"] == "dot1q-tunnel"
        entry = h.journald.entries("SYSLOG_IDENTIFIER=pve-vhost-agent", f"VMID={h.vmid}", "ACTION=CheckTapLinks",
                                   count=1, timeout=10)[0]
        assert (entry["PHASE"], entry["NIC"], entry["PORT"], entry["RESULT"]) == ("post-start", "net0", h.tap, "warning")
    finally:
        subprocess.run(["ip", "-n", h.ovs.netns, "link", "del", uplink], capture_output=True)


def test_a_clone_with_the_agents_args_but_no_spec_is_refused_not_started(harness):
    """`qm clone` copies `args:` (VM 100's socket and MAC) and `hookscript:`, not the spec."""
    h = harness
    h.declare_and_enable()
    clone = h.vmid + 1
    text = h.node.vm_conf(h.vmid).read_text()
    h.cluster.write_vm_config("nodeA", clone, text.replace("name: router", "name: clone"))
    with pytest.raises(StartAborted) as caught:
        h.qm().start(clone)
    log = caught.value.task.text
    assert f"VM {clone} has the agent's vhost-user args but no spec" in log
    assert f"they use the socket of VM {h.vmid}" in log and f"pve-vhost-agent apply {clone}" in log
    assert caught.value.task.hooks[0].returncode == 9
    assert not (h.socket.parent / f"vm-{clone}-1.sock").exists() and not h.socket.exists()
    # Declared like VM 100 (the agent's hookscript is set: the args follow at once), the
    # clone gets a socket of its own.
    h.cli("nic", "add", str(clone), "net1", "--bridge", h.vhost_bridge, "--mac", "02:00:00:00:00:11")
    vm = h.qm().start(clone)
    assert chardev_connected(vm, "vhu-net1")
    assert f"/vm-{clone}-1.sock" in " ".join(vm.argv) and f"/vm-{h.vmid}-1.sock" not in " ".join(vm.argv)
    h.qm().stop(clone)
    h.cli("nic", "remove", str(clone), "net1")


def test_post_stop_removes_the_ports_of_a_vm_whose_spec_went_while_it_ran(harness):
    h = harness
    h.declare_and_enable()
    h.qm().start(h.vmid)
    h.cli("nic", "remove", str(h.vmid), "net1")
    h.cli("qinq", "remove", str(h.vmid), "net0")
    assert h.vhost_port in h.owned_ports()
    h.qm().stop(h.vmid)
    assert h.owned_ports() == [] and not h.socket.exists()


def as_migration_target(h, config: str) -> dict:
    """The config as the target's pre-start sees it (still in the source's folder)."""
    h.node.vm_conf(h.vmid).write_text(config)
    return {"migrated_from": "nodeA", "PVE_VHOST_AGENT_NODE": "nodeB"}


def test_a_migration_start_checks_and_plans_from_the_main_section(harness):
    h = harness
    h.declare_and_enable()
    main = h.node.vm_conf(h.vmid).read_text()
    # Memory raised while the VM ran; the new args are not written yet. The migration
    # start uses the main section (128 MiB, its args): nothing is stale for it.
    target = as_migration_target(h, main + "\n[PENDING]\nmemory: 192\n")
    migrating = h.hook("pre-start", **target)
    assert migrating.returncode == 0, migrating.stdout
    assert h.vhost_port in h.owned_ports()
    cold = h.hook("pre-start")  # a cold start applies the pending memory: now it is stale
    assert cold.returncode == 9 and "memory changed from 128 to 192 MiB" in cold.stdout


def test_a_migration_start_refuses_a_nic_the_spec_dropped_while_the_vm_ran(harness):
    h = harness
    h.declare_and_enable()
    h.cli("nic", "add", str(h.vmid), "net2", "--bridge", h.vhost_bridge)
    running = h.node.vm_conf(h.vmid).read_text()  # the args the VM runs with: net1 and net2
    h.cli("nic", "remove", str(h.vmid), "net2")
    pending_args = h.node.vm_conf(h.vmid).read_text().split("args: ", 1)[1].split("\n", 1)[0]
    target = as_migration_target(h, running + f"\n[PENDING]\nargs: {pending_args}\n")
    migrating = h.hook("pre-start", **target)
    assert migrating.returncode == 9
    assert (f"VM {h.vmid}: its running args still have net2, which the spec no longer declares; "
            "restart the VM before migrating, or re-add the NIC") in migrating.stdout
    assert h.owned_ports() == []


def test_a_resume_from_hibernation_uses_the_main_section(harness):
    h = harness
    h.declare_and_enable()
    main = h.node.vm_conf(h.vmid).read_text()
    h.node.vm_conf(h.vmid).write_text(main + "vmstate: local:state-suspend.raw\n\n[PENDING]\nmemory: 192\n")
    resuming = h.hook("pre-start")
    assert resuming.returncode == 0, resuming.stdout
    # Args written now wait for the cold start after the resume: [PENDING], as for a running VM.
    h.cli("apply", str(h.vmid))
    text = h.node.vm_conf(h.vmid).read_text()
    assert text.startswith(main) and "size=192M" in text.split("[PENDING]", 1)[1]


def test_an_external_nic_whose_switch_does_not_listen_aborts_the_start_at_once(harness):
    h = harness
    h.write_vm()
    h.cli("nic", "add", str(h.vmid), "net1", "--bridge", h.vhost_bridge, "--backend", "external")
    h.cli("enable", str(h.vmid))
    sock = h.node.path("/run/pve-vhost-agent/external") / f"vm-{h.vmid}-1.sock"
    with pytest.raises(StartAborted) as caught:
        h.qm().start(h.vmid)  # without the check: QEMU retries until the start times out
    assert (f"start VPP/TNSR first (it must create {sock}), or order the VM's start after it"
            in caught.value.task.text)
    with VhostUserStub(sock) as switch:
        switch.listen()
        vm = h.qm().start(h.vmid)
        assert chardev_connected(vm, "vhu-net1")
        h.qm().stop(h.vmid)


def test_a_hugepages_vm_starts_on_a_host_with_no_hugepages_reserved_yet(harness):
    """qemu-server reserves hugepages itself after pre-start: nr_hugepages=0 is normal."""
    h = harness
    h.cluster.write_vm_config("nodeA", h.vmid, (
        f"balloon: 0\nhugepages: 2\nmemory: 128\nname: router\nnuma: 1\n"
        f"net0: virtio=BC:24:11:00:00:01,bridge={h.tap_bridge}\n"))
    h.cli("nic", "add", str(h.vmid), "net1", "--bridge", h.vhost_bridge)
    h.cli("enable", str(h.vmid))
    vm = h.qm().start(h.vmid)
    assert chardev_connected(vm, "vhu-net1")
    assert "ERROR" not in vm.task.text


def test_an_adopted_tnsr_recipe_vm_starts_in_real_qemu_on_its_external_socket(harness):
    """A VM set up by the TNSR recipe by hand: `adopt` declares its NIC on the same socket,
    keeps its MAC and the user's other words, and the stand-in's command line (checked
    against Proxmox's corpus) starts in real QEMU, connected to the switch's socket."""
    h = harness
    with tempfile.TemporaryDirectory(prefix="h12ad", dir="/tmp") as vpp:
        sock = Path(vpp) / f"vm-{h.vmid}-0.sock"
        recipe = (f"-chardev socket,id=char1,path={sock},reconnect=2 "
                  f"-netdev type=vhost-user,id=vm-{h.vmid}-0,chardev=char1,vhostforce=on "
                  "-object memory-backend-file,id=mem1000,size=128M,mem-path=/dev/shm,share=on "
                  f"-numa node,memdev=mem1000 -device virtio-net-pci,netdev=vm-{h.vmid}-0,mac=02:AA:BB:00:00:07 "
                  "-smbios type=1,serial=router7")
        h.cluster.write_vm_config("nodeA", h.vmid, (
            f"args: {recipe}\nballoon: 0\nhookscript: local:snippets/pve-vhost-agent\nmemory: 128\nname: router\n"))
        h.cli("install-hook")
        dry = h.cli("adopt", str(h.vmid), "--dry-run")
        assert f"QEMU keeps connecting to {sock}" in dry.stdout and "MAC 02:AA:BB:00:00:07" in dry.stdout
        h.cli("adopt", str(h.vmid))
        args = h.cli("show", str(h.vmid), "--json").stdout
        assert '"in_sync": true' in args
        line = next(x for x in h.node.vm_conf(h.vmid).read_text().splitlines() if x.startswith("args: "))
        assert line.startswith("args: -smbios type=1,serial=router7 -object memory-backend-memfd")
        assert "/dev/shm" not in line and "-numa" not in line and f"path={sock},reconnect" in line
        with VhostUserStub(sock) as switch:
            switch.listen()
            vm = h.qm().start(h.vmid)
            assert chardev_connected(vm, "vhu-net1")
            h.qm().stop(h.vmid)
