"""`nic` and `qinq` commands as a user runs them, against a private Proxmox-like root."""

import concurrent.futures
import json

import pytest

from pve_vhost_agent.errors import ExitCode
from pve_vhost_agent.adapters.specstore import load_spec

VM = """\
#edge router
boot: order=scsi0
cores: 2
memory: 2048
name: router
net0: virtio=BC:24:11:AA:00:01,bridge=vmbr0,tag=200
net2: virtio=BC:24:11:AA:00:02,bridge=vmbr0,tag=10
net3: virtio=BC:24:11:AA:00:03
net7: virtio=BC:24:11:AA:00:07,bridge=vmbr0,firewall=1
net11: virtio=BC:24:11:AA:00:0B,bridge=vmbr0
net12: virtio=BC:24:11:AA:00:0C,bridge=vmbr0,tag=5,trunks=10;20
numa: 0
ostype: l26

[PENDING]
net4: virtio=BC:24:11:AA:00:04,bridge=vmbr1,tag=201
"""


@pytest.fixture
def cluster(pve_root):
    pve_root.write_vm(100, VM)
    pve_root.write_vm(200, VM, node="pve2")
    return pve_root


def ok(root, *args):
    result = root.cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def declared(root):
    return load_spec(root.settings())


def test_add_declares_the_nic_and_says_what_to_do_next(cluster):
    out = ok(cluster, "nic", "add", "100", "net1", "--bridge", "br-dpdk", "--tag", "10", "--queues", "2")
    assert out.splitlines()[0].startswith("VM 100 net1: declared: vhost-user on bridge br-dpdk")
    assert "`pve-vhost-agent enable 100` sets the hookscript and writes the args line" in out
    nic = declared(cluster).entry(100, 1)
    assert (nic.bridge, nic.vlan.tag, nic.queues, nic.backend.value) == ("br-dpdk", 10, 2, "ovs")
    assert cluster.vm_path(100).read_text() == VM  # not enabled: only the spec changes


ENABLED = "balloon: 0\nhookscript: local:snippets/pve-vhost-agent\nmemory: 1024\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n"


def test_on_an_enabled_vm_the_args_follow_the_spec_at_once(cluster):
    cluster.write_vm(300, ENABLED)
    out = ok(cluster, "nic", "add", "300", "net1", "--bridge", "br0")
    assert ("VM 300: args written to the VM config (the shared memory backend is missing from the args; "
            "net1 is declared but not in the args; tag vhost-user added; notes line added)") in out
    assert "vhu-net1" in cluster.vm_path(300).read_text()
    ok(cluster, "nic", "remove", "300", "net1")
    assert cluster.vm_path(300).read_text() == ENABLED


def test_on_an_enabled_vm_a_spec_it_could_not_start_with_is_not_written(cluster):
    cluster.write_vm(300, ENABLED.replace("balloon: 0\n", ""))
    before = cluster.snapshot()
    result = cluster.cli("nic", "add", "300", "net1", "--bridge", "br0")
    assert result.returncode == 8 and "balloon" in result.stderr and len(result.stderr.splitlines()) == 1
    assert cluster.snapshot() == before


def test_default_mac_is_random_locally_administered_unique_and_kept(cluster):
    ok(cluster, "nic", "add", "100", "net1", "--bridge", "br0")
    mac = declared(cluster).entry(100, 1).mac
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01
    assert mac not in VM
    ok(cluster, "nic", "add", "100", "net5", "--bridge", "br0")
    assert declared(cluster).entry(100, 5).mac != mac
    ok(cluster, "nic", "set", "100", "net1", "--mtu", "9000")
    assert declared(cluster).entry(100, 1).mac == mac  # chosen once, stored, never changed
    # Every cluster's VM 100 net1 would get the same MAC from a hash of its ids: random it is.
    ok(cluster, "nic", "remove", "100", "net1")
    ok(cluster, "nic", "add", "100", "net1", "--bridge", "br0")
    assert declared(cluster).entry(100, 1).mac != mac


def test_the_clusters_mac_prefix_is_honoured(cluster):
    (cluster.root / "etc/pve/datacenter.cfg").write_text("keyboard: en-us\nmac_prefix: bc:24:11\n")
    ok(cluster, "nic", "add", "100", "net1", "--bridge", "br0")
    assert declared(cluster).entry(100, 1).mac.startswith("BC:24:11:")
    (cluster.root / "etc/pve/datacenter.cfg").write_text("mac_prefix: 01:00\n")
    result = cluster.cli("nic", "add", "100", "net9", "--bridge", "br0")
    assert result.returncode == ExitCode.BAD_SPEC and "mac_prefix '01:00' in datacenter.cfg" in result.stderr


def test_given_mac_is_stored_in_proxmox_form(cluster):
    ok(cluster, "nic", "add", "100", "net1", "--bridge", "br0", "--mac", "02:ab:cd:00:00:01")
    assert "\tmac 02:AB:CD:00:00:01\n" in cluster.spec_file(100).read_text()


def test_a_vm_of_another_node_can_be_declared_cluster_wide(cluster):
    ok(cluster, "nic", "add", "200", "net1", "--bridge", "br0", "--backend", "external")
    assert declared(cluster).entry(200, 1).backend.value == "external"


def test_dry_run_prints_the_section_and_writes_nothing(cluster):
    ok(cluster, "nic", "add", "100", "net1", "--bridge", "br0", "--mac", "02:00:00:00:00:01")
    before = cluster.snapshot()
    out = ok(cluster, "nic", "add", "100", "net5", "--bridge", "br1", "--qinq", "300", "--cvlans", "10,20-22",
             "--ethertype", "802.1q", "--mac", "02:00:00:00:00:05", "--dry-run")
    assert out == (f"dry run: would write this section to {cluster.spec_file(100)}:\n"
                   "vhostuser: 100-net5\n\tbridge br1\n\tmac 02:00:00:00:00:05\n"
                   "\tqinq 300\n\tcvlans 10,20-22\n\tethertype 802.1q\n\n")
    out = ok(cluster, "nic", "set", "100", "net1", "--mtu", "9000", "--dry-run")
    assert "\tmtu 9000\n" in out
    out = ok(cluster, "nic", "remove", "100", "net1", "--dry-run")
    assert out.startswith("dry run: would remove this section from") and "vhostuser: 100-net1\n" in out
    assert cluster.snapshot() == before


def test_set_changes_only_the_given_fields_and_replaces_the_vlan_mode(cluster):
    ok(cluster, "nic", "add", "100", "net1", "--bridge", "br0", "--tag", "10", "--mtu", "1500")
    mac = declared(cluster).entry(100, 1).mac
    ok(cluster, "nic", "set", "100", "net1", "--trunks", "10,20-30", "--queues", "4")
    nic = declared(cluster).entry(100, 1)
    assert (nic.vlan.tag, nic.vlan.trunks[:2], nic.queues, nic.mtu, nic.mac) == (None, (10, 20), 4, 1500, mac)
    ok(cluster, "nic", "set", "100", "net1", "--qinq", "500", "--cvlans", "7")
    assert declared(cluster).entry(100, 1).vlan.qinq.cvlans == (7,)
    ok(cluster, "nic", "set", "100", "net1", "--no-vlan")
    assert declared(cluster).entry(100, 1).vlan.mode == ""
    assert ok(cluster, "nic", "set", "100", "net1", "--no-vlan") == "VM 100 net1: nothing to change\n"


def test_remove_takes_the_nic_out_even_when_the_vm_is_gone(cluster):
    ok(cluster, "nic", "add", "100", "net1", "--bridge", "br0")
    cluster.vm_path(100).unlink()
    out = ok(cluster, "nic", "remove", "100", "net1")
    assert out.startswith(f"VM 100 net1: removed from {cluster.spec_file(100)}")
    assert declared(cluster).entry(100, 1) is None


def test_qinq_on_proxmox_tap_nics_uses_the_effective_config(cluster):
    ok(cluster, "qinq", "set", "100", "net0", "--qinq", "200")
    ok(cluster, "qinq", "set", "100", "net4", "--qinq", "201", "--ethertype", "802.1q")  # pending NIC
    taps = declared(cluster).tap_qinq
    assert [(t.index, t.qinq.stag, t.qinq.ethertype.value) for t in taps] == [(0, 200, "802.1ad"), (4, 201, "802.1q")]
    ok(cluster, "qinq", "set", "100", "net0", "--qinq", "200", "--cvlans", "5-6")
    assert declared(cluster).entry(100, 0).qinq.cvlans == (5, 6)
    ok(cluster, "qinq", "remove", "100", "net0")
    assert declared(cluster).entry(100, 0) is None
    assert cluster.vm_path(100).read_text() == VM


def test_list_shows_both_kinds_and_json_has_every_field(cluster):
    assert ok(cluster, "nic", "list") == "no NICs declared\n"
    ok(cluster, "nic", "add", "100", "net1", "--bridge", "br-dpdk", "--mac", "02:00:00:00:00:01", "--tag", "10")
    ok(cluster, "nic", "add", "200", "net6", "--bridge", "br1", "--mac", "02:00:00:00:00:06", "--backend", "external",
       "--trunks", "1-3", "--rx-queue-size", "512", "--mtu", "9000")
    ok(cluster, "qinq", "set", "100", "net0", "--qinq", "200", "--cvlans", "10,11")
    lines = ok(cluster, "nic", "list").splitlines()
    assert [line.split(":")[0] for line in lines] == ["100 net0", "100 net1", "200 net6"]
    assert "QinQ on tap100i0" in lines[0]
    rows = json.loads(ok(cluster, "nic", "list", "--json"))
    assert rows[0] == {
        "vmid": 100, "nic": "net0", "kind": "qinq", "backend": None, "bridge": "vmbr0", "mac": "BC:24:11:AA:00:01",
        "vlan_mode": "dot1q-tunnel", "tag": None, "trunks": [], "qinq": 200, "cvlans": [10, 11],
        "ethertype": "802.1ad", "queues": None, "rx_queue_size": None, "tx_queue_size": None, "mtu": None,
        "port": "tap100i0", "socket": None, "summary": "QinQ on tap100i0, S-tag 200 (802.1ad), C-VLANs 10-11",
    }
    assert rows[1] == {
        "vmid": 100, "nic": "net1", "kind": "vhostuser", "backend": "ovs", "bridge": "br-dpdk",
        "mac": "02:00:00:00:00:01", "vlan_mode": "access", "tag": 10, "trunks": [], "qinq": None, "cvlans": [],
        "ethertype": None, "queues": 1, "rx_queue_size": 1024, "tx_queue_size": 1024, "mtu": None,
        "port": "vhu100i1", "socket": str(cluster.root / "run/pve-vhost-agent/ovs/vm-100-1.sock"),
        "summary": "vhost-user on bridge br-dpdk, backend ovs, MAC 02:00:00:00:00:01, VLAN tag 10",
    }
    assert (rows[2]["backend"], rows[2]["trunks"], rows[2]["rx_queue_size"], rows[2]["mtu"]) == ("external", [1, 2, 3], 512, 9000)
    assert rows[2]["socket"].endswith("/run/pve-vhost-agent/external/vm-200-6.sock")
    assert [r["nic"] for r in json.loads(ok(cluster, "nic", "list", "200", "--json"))] == ["net6"]


# --- bad input: one line, the error's exit code, nothing written -------------------------

ADD = ("nic", "add", "100")
BAD = [
    ("unknown VM", ("nic", "add", "999", "net1", "--bridge", "br0"), ExitCode.NOT_FOUND, "VM 999 does not exist"),
    ("VM id 0", ("nic", "add", "0", "net1", "--bridge", "br0"), ExitCode.BAD_SPEC, "VM id 0"),
    ("netN in the config", ADD + ("net0", "--bridge", "br0"), ExitCode.CONFLICT,
     "`net0: virtio=BC:24:11:AA:00:01,bridge=vmbr0,tag=200` in its config; pick a free netN"),
    ("netN pending in the config", ADD + ("net4", "--bridge", "br0"), ExitCode.CONFLICT, "`net4: virtio="),
    ("netN already declared", ADD + ("net1", "--bridge", "br0"), ExitCode.CONFLICT, "already declared"),
    ("bad NIC name", ADD + ("eth1", "--bridge", "br0"), ExitCode.BAD_SPEC, "'eth1' is not a NIC name"),
    ("NIC index 32", ADD + ("net32", "--bridge", "br0"), ExitCode.BAD_SPEC, "'net32' is not a NIC name"),
    ("tag 0", ADD + ("net5", "--bridge", "br0", "--tag", "0"), ExitCode.BAD_SPEC, "outside 1-4094"),
    ("tag 4095", ADD + ("net5", "--bridge", "br0", "--tag", "4095"), ExitCode.BAD_SPEC, "outside 1-4094"),
    ("trunk 5000", ADD + ("net5", "--bridge", "br0", "--trunks", "10,4000-5000"), ExitCode.BAD_SPEC, "outside 1-4094"),
    ("S-tag 4095", ADD + ("net5", "--bridge", "br0", "--qinq", "4095"), ExitCode.BAD_SPEC, "S-tag 4095"),
    ("cvlan 0", ADD + ("net5", "--bridge", "br0", "--qinq", "5", "--cvlans", "0-3"), ExitCode.BAD_SPEC, "outside 1-4094"),
    ("cvlans without qinq", ADD + ("net5", "--bridge", "br0", "--cvlans", "10"), ExitCode.BAD_SPEC, "--cvlans applies only"),
    ("ethertype without qinq", ADD + ("net5", "--bridge", "br0", "--tag", "3", "--ethertype", "802.1q"),
     ExitCode.BAD_SPEC, "--ethertype applies only"),
    ("two VLAN modes", ADD + ("net5", "--bridge", "br0", "--tag", "3", "--trunks", "4"), ExitCode.BAD_SPEC, "only one VLAN mode"),
    ("MAC taken in the spec", ADD + ("net5", "--bridge", "br0", "--mac", "02:00:00:00:00:01"), ExitCode.BAD_SPEC,
     "MAC 02:00:00:00:00:01 is already used by VM 100 net1"),
    ("MAC of the VM's own NIC", ADD + ("net5", "--bridge", "br0", "--mac", "bc:24:11:aa:00:03"), ExitCode.CONFLICT,
     "already used by net3 of VM 100"),
    ("MAC of a pending NIC", ADD + ("net5", "--bridge", "br0", "--mac", "BC:24:11:AA:00:04"), ExitCode.CONFLICT, "net4"),
    ("multicast MAC", ADD + ("net5", "--bridge", "br0", "--mac", "03:00:00:00:00:01"), ExitCode.BAD_SPEC, "multicast"),
    ("all-zero MAC", ADD + ("net5", "--bridge", "br0", "--mac", "00:00:00:00:00:00"), ExitCode.BAD_SPEC, "all zeros"),
    ("malformed MAC", ADD + ("net5", "--bridge", "br0", "--mac", "02:00:00:00:01"), ExitCode.BAD_SPEC, "malformed"),
    ("MAC with a comma", ADD + ("net5", "--bridge", "br0", "--mac", "02:00:00:00:00:01,x=1"), ExitCode.BAD_SPEC, "malformed"),
    ("bridge with space", ADD + ("net5", "--bridge", "br 0"), ExitCode.BAD_SPEC, "not a valid interface name"),
    ("bridge with comma", ADD + ("net5", "--bridge", "br0,id=x"), ExitCode.BAD_SPEC, "not a valid interface name"),
    ("bridge with =", ADD + ("net5", "--bridge", "br=0"), ExitCode.BAD_SPEC, "not a valid interface name"),
    ("bridge with quote", ADD + ("net5", "--bridge", "br'0"), ExitCode.BAD_SPEC, "not a valid interface name"),
    ("bridge with double quote", ADD + ("net5", "--bridge", 'br"0'), ExitCode.BAD_SPEC, "not a valid interface name"),
    ("bridge with newline", ADD + ("net5", "--bridge", "br0\nargs: -x"), ExitCode.BAD_SPEC, "not a valid interface name"),
    ("bridge too long", ADD + ("net5", "--bridge", "b" * 16), ExitCode.BAD_SPEC, "not a valid interface name"),
    ("queues 0", ADD + ("net5", "--bridge", "br0", "--queues", "0"), ExitCode.BAD_SPEC, "queues 0"),
    ("queue size 300", ADD + ("net5", "--bridge", "br0", "--tx-queue-size", "300"), ExitCode.BAD_SPEC, "tx queue size 300"),
    ("MTU 10", ADD + ("net5", "--bridge", "br0", "--mtu", "10"), ExitCode.BAD_SPEC, "MTU 10"),
    ("set an undeclared NIC", ("nic", "set", "100", "net5", "--tag", "3"), ExitCode.NOT_FOUND, "no vhost-user NIC net5"),
    ("set --no-vlan with --tag", ("nic", "set", "100", "net1", "--no-vlan", "--tag", "3"), ExitCode.BAD_SPEC, "--no-vlan"),
    ("set a taken MAC", ("nic", "set", "100", "net1", "--mac", "BC:24:11:AA:00:01"), ExitCode.CONFLICT, "net0 of VM 100"),
    ("set a QinQ tap NIC", ("nic", "set", "100", "net0", "--tag", "3"), ExitCode.CONFLICT, "change it with `pve-vhost-agent qinq set"),
    ("remove an undeclared NIC", ("nic", "remove", "100", "net5"), ExitCode.NOT_FOUND, "no vhost-user NIC net5"),
    ("qinq on a missing netN", ("qinq", "set", "100", "net5", "--qinq", "5"), ExitCode.NOT_FOUND, "no net5 in its config"),
    ("qinq on a NIC without bridge", ("qinq", "set", "100", "net3", "--qinq", "5"), ExitCode.CONFLICT, "has no bridge"),
    ("qinq on a NIC with another tag", ("qinq", "set", "100", "net2", "--qinq", "5"), ExitCode.CONFLICT,
     "`net2: virtio=BC:24:11:AA:00:02,bridge=vmbr0,tag=10` needs tag=5 (the S-tag)"),
    # Untagged, pve-bridge would plug a trunk of every VLAN until post-start: refused, with the fix.
    ("qinq on an untagged NIC", ("qinq", "set", "100", "net11", "--qinq", "5"), ExitCode.CONFLICT,
     "untagged it would carry every VLAN; run `qm set 100 --net11 virtio=BC:24:11:AA:00:0B,bridge=vmbr0,tag=5`\n"),
    ("qinq on a NIC with trunks", ("qinq", "set", "100", "net12", "--qinq", "5"), ExitCode.CONFLICT,
     "`qm set 100 --net12 virtio=BC:24:11:AA:00:0C,bridge=vmbr0,tag=5`\n"),
    ("qinq on a firewalled NIC", ("qinq", "set", "100", "net7", "--qinq", "5"), ExitCode.CONFLICT,
     "has firewall=1, so its OVS port is Proxmox's firewall veth"),
    ("qinq on a firewalled NIC, the fix", ("qinq", "set", "100", "net7", "--qinq", "5"), ExitCode.CONFLICT,
     "`qm set 100 --net7 virtio=BC:24:11:AA:00:07,bridge=vmbr0,tag=5`\n"),
    ("qinq on a vhost NIC", ("qinq", "set", "100", "net1", "--qinq", "5"), ExitCode.CONFLICT, "declared as a vhost-user NIC"),
    ("qinq S-tag 0", ("qinq", "set", "100", "net0", "--qinq", "0"), ExitCode.BAD_SPEC, "S-tag 0"),
    ("qinq on an unknown VM", ("qinq", "set", "999", "net0", "--qinq", "5"), ExitCode.NOT_FOUND, "VM 999 does not exist"),
    ("qinq remove undeclared", ("qinq", "remove", "100", "net4"), ExitCode.NOT_FOUND, "no QinQ declared"),
]


@pytest.fixture
def declared_cluster(cluster):
    cluster.legacy_spec_file.write_text("qinq: 100-net0\n\tqinq 100\n\n"  # also: the old single file is read
                                 "vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\n")
    return cluster


@pytest.mark.parametrize("args, code, problem", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_with_its_exit_code_and_writes_nothing(declared_cluster, args, code, problem):
    before = declared_cluster.snapshot()
    result = declared_cluster.cli(*args)
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("pve-vhost-agent: ")
    assert problem in result.stderr
    assert "; " in result.stderr  # problem; fix
    assert declared_cluster.snapshot() == before


def test_malformed_spec_file_is_named_with_its_line(cluster):
    cluster.legacy_spec_file.write_text("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\tvlan 5\n")
    before = cluster.snapshot()
    for args in (("nic", "list"), ("nic", "add", "100", "net5", "--bridge", "br0")):
        result = cluster.cli(*args)
        assert result.returncode == ExitCode.BAD_SPEC
        assert result.stderr == (f"pve-vhost-agent: {cluster.legacy_spec_file} line 4: unknown key 'vlan' in a vhostuser section; "
                                 "use only: bridge, mac, backend, socket, tag, trunks, qinq, cvlans, ethertype, queues, "
                                 "rx-queue-size, tx-queue-size, mtu\n")
    assert cluster.snapshot() == before


def test_read_only_etc_pve_says_no_quorum_and_writes_nothing(cluster):
    before = cluster.snapshot()
    result = cluster.cli("nic", "add", "100", "net1", "--bridge", "br0", read_only_pve=True)
    assert result.returncode == ExitCode.REFUSED
    assert result.stderr.startswith("pve-vhost-agent: /etc/pve is read-only: this node has no quorum")
    assert result.stderr.count("\n") == 1
    assert cluster.snapshot() == before
    # Reading still works without quorum.
    assert cluster.cli("nic", "list", read_only_pve=True).returncode == 0


def test_concurrent_adds_lose_no_update(cluster):
    # Each command re-reads the file under the cluster lock, so none overwrites another.
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda n: cluster.cli("nic", "add", "200", f"net{n}", "--bridge", "br0"),
                                [1, 5, 6, 8, 9, 10]))
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    assert sorted(n.index for n in declared(cluster).nics) == [1, 5, 6, 8, 9, 10]
    assert not cluster.settings().cluster_lock_dir.exists()
