"""The cluster-wide spec file: exact format, round trips, and errors that name the line."""

import pytest
from hypothesis import given, settings, strategies as st

from pve_vhost_agent.model import spec
from pve_vhost_agent.errors import ExitCode, SpecError
from pve_vhost_agent.formats.specfile import format_spec, parse_spec

EXAMPLE = """\
vhostuser: 100-net1
\tbridge br-dpdk
\tmac 02:9A:3C:11:20:07
\ttag 10

vhostuser: 100-net2
\tbridge br-dpdk
\tmac 02:9A:3C:11:20:08
\tbackend external
\tqinq 200
\tcvlans 10,20-22
\tethertype 802.1q
\tqueues 4
\trx-queue-size 512
\tmtu 9000

qinq: 101-net0
\tqinq 300

"""


def test_example_parses_to_the_declared_values():
    cluster = parse_spec(EXAMPLE)
    first, second = cluster.nics
    assert (first.vmid, first.index, first.bridge, first.vlan.tag, first.backend) == (100, 1, "br-dpdk", 10, spec.Backend.OVS)
    assert first.queues == 1 and first.rx_queue_size == 1024 and first.mtu is None
    assert second.backend == spec.Backend.EXTERNAL
    assert second.vlan.qinq == spec.QinQ(200, (10, 20, 21, 22), spec.EtherType.DOT1Q)
    assert (second.queues, second.rx_queue_size, second.tx_queue_size, second.mtu) == (4, 512, 1024, 9000)
    assert cluster.tap_qinq == (spec.TapQinQ(101, 0, spec.QinQ(300)),)
    assert format_spec(cluster) == EXAMPLE


def test_output_is_sorted_and_defaults_are_left_out():
    nics = (spec.VhostNic(200, 3, "br1", "02:00:00:00:00:02"), spec.VhostNic(100, 7, "br1", "02:00:00:00:00:01"))
    text = format_spec(spec.ClusterSpec(nics, (spec.TapQinQ(100, 0, spec.QinQ(5)),)))
    assert text == ("qinq: 100-net0\n\tqinq 5\n\n"
                    "vhostuser: 100-net7\n\tbridge br1\n\tmac 02:00:00:00:00:01\n\n"
                    "vhostuser: 200-net3\n\tbridge br1\n\tmac 02:00:00:00:00:02\n\n")


def test_empty_file_comments_and_blank_lines():
    assert parse_spec("") == spec.ClusterSpec()
    assert parse_spec("# written by hand\n\n\nqinq: 100-net0\n\tqinq 5\n# note\n") == spec.ClusterSpec(
        (), (spec.TapQinQ(100, 0, spec.QinQ(5)),))


def test_lowercase_mac_is_read_as_proxmox_writes_it():
    nic = parse_spec("vhostuser: 100-net1\n  bridge br0\n  mac 02:ab:cd:ef:00:01\n").nics[0]
    assert nic.mac == "02:AB:CD:EF:00:01"


BAD = [
    ("vhostuser 100-net1\n", 1, "not a section header"),
    ("vlan: 100-net1\n\tbridge br0\n", 1, "unknown section type 'vlan'"),
    ("vhostuser: 100-eth1\n\tbridge br0\n", 1, "is not <vmid>-net<N>"),
    ("vhostuser: 100-net32\n\tbridge br0\n\tmac 02:00:00:00:00:01\n", 1, "'net32' is not a NIC name"),
    ("vhostuser: 0-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n", 1, "VM id 0"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tcolour red\n", 3, "unknown key 'colour'"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tbridge br1\n", 3, "key 'bridge' is repeated"),
    ("vhostuser: 100-net1\n\tbridge\n", 2, "key 'bridge' has no value"),
    ("\tbridge br0\n", 1, "indented line outside a section"),
    ("vhostuser: 100-net1\n\tbridge br0\n\n\tmac 02:00:00:00:00:01\n", 4, "indented line outside a section"),
    ("vhostuser: 100-net1\n\tbridge br0\n", 1, "no `mac` line"),
    ("vhostuser: 100-net1\n\tmac 02:00:00:00:00:01\n", 1, "no `bridge` line"),
    ("vhostuser: 100-net1\n\tbridge br,0\n\tmac 02:00:00:00:00:01\n", 2, "not a valid interface name"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 01:00:00:00:00:01\n", 3, "multicast"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 00:00:00:00:00:00\n", 3, "all zeros"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\ttag ²\n", 4, "'²' is not a number"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\tqueues " + "9" * 5000 + "\n", 4,
     "is not a number"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\ttrunks 1,²\n", 4, "has a bad item '²'"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\ttag 4095\n", 1, "outside 1-4094"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\ttag ten\n", 4, "'ten' is not a number"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\ttrunks 10-5\n", 4, "runs backwards"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\tcvlans 10\n", 4, "`cvlans` is set without `qinq`"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\ttag 5\n\tqinq 6\n", 1, "only one VLAN mode"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\tbackend vpp\n", 4, "backend 'vpp' is not known"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\tqueues 65\n", 1, "queues 65"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\trx-queue-size 300\n", 1, "rx queue size 300"),
    ("qinq: 100-net1\n\tcvlans 10\n", 2, "`cvlans` is set without `qinq`"),
    ("qinq: 100-net1\n\tqinq 0\n", 2, "S-tag 0 is outside"),
    ("qinq: 100-net1\n\tqinq 5\n\tethertype 0x88a8\n", 3, "ethertype '0x88a8' is not known"),
    ("qinq: 100-net1\n\tqinq 5\n\tbridge br0\n", 3, "unknown key 'bridge' in a qinq section"),
    ("qinq: 100-net1\n\tqinq 5\n\nqinq: 100-net1\n\tqinq 6\n", 4, "declared again (first on line 1)"),
    ("vhostuser: 100-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n\n"
     "vhostuser: 101-net1\n\tbridge br0\n\tmac 02:00:00:00:00:01\n", 5, "already used by 100-net1 (line 1)"),
]


@pytest.mark.parametrize("text, line, problem", BAD, ids=[b[2] for b in BAD])
def test_malformed_file_names_the_line_the_problem_and_a_fix(text, line, problem):
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "/etc/pve/pve-vhost-agent.cfg")
    message = str(caught.value)
    assert message.startswith(f"/etc/pve/pve-vhost-agent.cfg line {line}")
    assert problem in message
    assert caught.value.fix and "\n" not in message
    assert caught.value.exit_code == ExitCode.BAD_SPEC


# --- property: any valid spec survives format -> parse -> format ----------------------

_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", fullmatch=True)
_vlan = st.integers(spec.VLAN_MIN, spec.VLAN_MAX)
_vlans = st.lists(_vlan, max_size=6).map(lambda v: tuple(sorted(set(v))))
_qinq = st.builds(spec.QinQ, stag=_vlan, cvlans=_vlans, ethertype=st.sampled_from(list(spec.EtherType)))
_policy = st.one_of(
    st.just(spec.VlanPolicy()),
    st.builds(spec.VlanPolicy, tag=_vlan),
    _vlans.filter(bool).map(lambda t: spec.VlanPolicy(trunks=t)),
    _qinq.map(lambda q: spec.VlanPolicy(qinq=q)),
)
_key = st.tuples(st.integers(1, 999_999_999), st.integers(0, spec.MAX_NICS - 1))


@st.composite
def cluster_specs(draw):
    keys = draw(st.lists(_key, unique=True, max_size=12))
    macs = draw(st.lists(st.integers(1, 2**40 - 1), unique=True, min_size=len(keys), max_size=len(keys)))
    nics, taps = [], []
    for (vmid, index), mac in zip(keys, macs):
        if draw(st.booleans()):
            taps.append(spec.TapQinQ(vmid, index, draw(_qinq)))
            continue
        nics.append(spec.VhostNic(
            vmid=vmid, index=index, bridge=draw(_names),
            mac=":".join(f"{b:02X}" for b in (b"\x02" + mac.to_bytes(5, "big"))),
            backend=draw(st.sampled_from(list(spec.Backend))), vlan=draw(_policy),
            queues=draw(st.integers(1, spec.QUEUES_MAX)),
            rx_queue_size=draw(st.sampled_from(spec.QUEUE_SIZES)),
            tx_queue_size=draw(st.sampled_from(spec.QUEUE_SIZES)),
            mtu=draw(st.none() | st.integers(spec.MTU_MIN, spec.MTU_MAX)),
        ))
    return spec.ClusterSpec(tuple(nics), tuple(taps))


@settings(max_examples=200, deadline=None)
@given(cluster=cluster_specs())
def test_spec_file_round_trips(cluster):
    text = format_spec(cluster)
    assert parse_spec(text) == cluster
    assert format_spec(parse_spec(text)) == text
