"""The args line: split exactly as Proxmox splits it, the agent's part found and replaced."""

import subprocess

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from pve_vhost_agent.errors import ConfigConflict, SpecError
from pve_vhost_agent.formats.qemuargs import (
    agent_args,
    check_user_args,
    merge_agent_args,
    parse_qemu_opts,
    split_args,
)

# PVE::Tools::split_args, as qemu-server calls it for `args:` (Perl's own module, real).
PVE_SPLIT_ARGS = r"""
use Text::ParseWords;
local $/; my $str = <STDIN>;
my $words = $str ? [Text::ParseWords::shellwords($str)] : [];
print scalar(@$words), "\0", map { "$_\0" } @$words;
"""


def proxmox_split(line: str) -> list[str]:
    out = subprocess.run(
        ["/usr/bin/perl", "-e", PVE_SPLIT_ARGS], input=line.encode(), capture_output=True, check=True, timeout=30
    ).stdout.split(b"\0")
    return [word.decode() for word in out[1:1 + int(out[0])]]


def words(line: str) -> list[str]:
    return [token.text for token in split_args(line)]


def written(line: str) -> list[str]:
    return [line[token.start:token.end] for token in split_args(line)]


PLAN = (
    "-object", "memory-backend-memfd,id=vhu-mem,size=2048M,share=on",
    "-machine", "memory-backend=vhu-mem",
    "-chardev", "socket,id=vhu-net1,path=/run/pve-vhost-agent/ovs/vm-100-1.sock,server=on,wait=off",
    "-netdev", "type=vhost-user,id=vhu-net1,chardev=vhu-net1,vhostforce=on",
    "-device", "virtio-net-pci,id=vhu-net1,netdev=vhu-net1,mac=02:00:00:00:00:01,bus=pci.0,addr=0x13,"
               "rx_queue_size=1024,tx_queue_size=1024",
)
PLAN_LINE = " ".join(PLAN)
OTHER_PLAN = (
    "-chardev", "socket,id=vhu-net7,path=/run/pve-vhost-agent/external/vm-100-7.sock,reconnect-ms=1000",
    "-netdev", "type=vhost-user,id=vhu-net7,chardev=vhu-net7,vhostforce=on",
    "-device", "virtio-net-pci,id=vhu-net7,netdev=vhu-net7,mac=02:00:00:00:00:07,bus=pci.1,addr=0x2,"
               "rx_queue_size=1024,tx_queue_size=1024",
)


# --- the split ------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected_words, expected_written", [
    ("", [], []),
    ("   ", [], []),
    ("0", [], []),  # false to Perl: qemu-server adds no args at all
    ("00", ["00"], ["00"]),
    ("-cpu host", ["-cpu", "host"], ["-cpu", "host"]),
    ("  -a\t b \n", ["-a", "b"], ["-a", "b"]),
    ("-smbios 'type=1,manufacturer=A B'", ["-smbios", "type=1,manufacturer=A B"],
     ["-smbios", "'type=1,manufacturer=A B'"]),
    ('-name "my vm"', ["-name", "my vm"], ["-name", '"my vm"']),
    ('a"b c"d', ["ab cd"], ['a"b c"d']),  # quotes glue to their neighbours
    ('"x\\"y\\\\z"', ['x"y\\z'], ['"x\\"y\\\\z"']),  # backslash escapes inside "..."
    ("'a\\'b'", ["a\\'b"], ["'a\\'b'"]),  # inside '...' a backslash stays, but shields the quote
    ("'a\\b'", ["a\\b"], ["'a\\b'"]),
    ("a\\ b c", ["a b", "c"], ["a\\ b", "c"]),  # an escaped blank joins
    ('"" x', ["", "x"], ['""', "x"]),  # an empty word is a word
    ("a\x0bb", ["a", "b"], ["a", "b"]),  # vertical tab is a blank to Perl
    ("é ü", ["é", "ü"], ["é", "ü"]),
])
def test_split_matches_proxmox(line, expected_words, expected_written):
    assert words(line) == expected_words
    assert written(line) == expected_written
    assert proxmox_split(line) == expected_words


@pytest.mark.parametrize("line, where", [
    ('-name "my vm', "unbalanced quote at character 7"),
    ("-name 'x", "unbalanced quote at character 7"),
    ("-a b\\", "trailing backslash at character 5"),
    ('-a "b\\"', "unbalanced quote at character 4"),
])
def test_a_line_proxmox_would_drop_is_refused(line, where):
    assert proxmox_split(line) == []  # Perl returns nothing for the whole line
    with pytest.raises(ConfigConflict, match=where):
        split_args(line)


def test_a_non_ascii_blank_is_refused_not_guessed():
    with pytest.raises(ConfigConflict, match=r"\(U\+00A0\) at character 5"):
        split_args("-cpu\u00a0host")


ARGS_TEXT = st.text(alphabet=st.sampled_from(list(" \t\x0b\x1c\"'\\ab-=,é") + ["\n"]), max_size=24)


@settings(max_examples=300, deadline=None)
@given(ARGS_TEXT)
@example("a'b\\'c'd \"e\\f\"")
def test_split_equals_perl_for_any_line(line):
    expected = proxmox_split(line)
    try:
        got = split_args(line)
    except ConfigConflict:
        # Refused only where Perl silently drops a line that has something in it.
        assert expected == [] and line.strip(" \t\n\r\f\v")
        return
    assert [t.text for t in got] == expected
    for token in got:  # each word's written form splits back to that word alone
        assert words(line[token.start:token.end]) == [token.text] or line[token.start:token.end] == "0"


# --- QEMU option values -----------------------------------------------------------------

@pytest.mark.parametrize("value, implied, expected", [
    ("socket,id=a,path=/x", "backend", {"backend": "socket", "id": "a", "path": "/x"}),
    ("file,path=/a,,b,id=c", "backend", {"backend": "file", "path": "/a,b", "id": "c"}),
    ("type=vhost-user,id=n", "type", {"type": "vhost-user", "id": "n"}),
    ("node,nodeid=0,memdev=m", "type", {"type": "node", "nodeid": "0", "memdev": "m"}),
    ('{"driver":"virtio-net-pci","id":"x","addr":144}', "driver",
     {"driver": "virtio-net-pci", "id": "x", "addr": "0x12.0"}),
    ('{"qom-type":"memory-backend-ram","id":"r","size":1024}', "qom-type",
     {"qom-type": "memory-backend-ram", "id": "r", "size": "1024"}),
    ("pc,accel=tcg", "type", {"type": "pc", "accel": "tcg"}),
])
def test_qemu_option_values(value, implied, expected):
    assert parse_qemu_opts(value, implied) == expected


# --- ownership --------------------------------------------------------------------------

@pytest.mark.parametrize("line, owned", [
    (PLAN_LINE, PLAN),
    ("-cpu host " + PLAN_LINE + " -name x", PLAN),
    # Any option with an agent id belongs to the agent, however it is written.
    ("--device 'virtio-net-pci,id=vhu-net3,bus=pci.0'", ("--device", "virtio-net-pci,id=vhu-net3,bus=pci.0")),
    ('-device \'{"driver":"virtio-net-pci","id":"vhu-net31"}\'',
     ("-device", '{"driver":"virtio-net-pci","id":"vhu-net31"}')),
    ("-M memory-backend=vhu-mem", ("-M", "memory-backend=vhu-mem")),
    # Not the agent's: other ids, other option kinds, a -machine with more in it.
    ("-device virtio-net-pci,id=vhu-net32", ()),
    ("-device virtio-net-pci,id=net3", ()),
    ("-object memory-backend-ram,id=vhu-net1", ()),
    ("-chardev socket,id=vhu-mem", ()),
    ("-machine memory-backend=vhu-mem,accel=tcg", ()),
    ("-name vhu-net1", ()),
    ("-device", ()),
])
def test_agent_args_are_found_by_id(line, owned):
    assert agent_args(line) == owned


# --- merge ------------------------------------------------------------------------------

@pytest.mark.parametrize("line, new, expected", [
    ("", PLAN, PLAN_LINE),
    ("-cpu host", PLAN, "-cpu host " + PLAN_LINE),
    ("-cpu host " + PLAN_LINE, PLAN, "-cpu host " + PLAN_LINE),
    # The user's words keep their quoting and the blanks after them; the old plan goes.
    ("-smbios 'type=1,x=a b'  " + " ".join(OTHER_PLAN) + "\t-name \"v m\"", PLAN,
     "-smbios 'type=1,x=a b'  -name \"v m\" " + PLAN_LINE),
    (PLAN_LINE + " -cpu host", (), "-cpu host"),
    (PLAN_LINE, (), ""),
    ("  -a  b  ", (), "-a  b"),
    ("0", PLAN, PLAN_LINE),
])
def test_merge_examples(line, new, expected):
    merged = merge_agent_args(line, new)
    assert merged == expected
    assert proxmox_split(merged) == words(expected)


@pytest.mark.parametrize("bad", [
    ("-chardev", "socket,id=vhu-net1,path=/run/a b.sock"),
    ("-chardev", "socket,id=vhu-net1,path=/run/a'b.sock"),
    ("-chardev", "socket,id=vhu-net1,path=/run/a\nb.sock"),
    ("-cpu", "host"),  # not agent-owned: the agent would lose track of it
    ("-device",),
])
def test_merge_refuses_agent_args_that_need_quoting_or_are_not_owned(bad):
    with pytest.raises(SpecError):
        merge_agent_args("-cpu host", bad)


@pytest.mark.parametrize("line", ["-cpu host -netdev", "-device", PLAN_LINE + " -object"])
def test_merge_refuses_a_user_option_left_without_its_value(line):
    # Appended after `-netdev`, the agent's `-object` would become the netdev's value.
    with pytest.raises(ConfigConflict, match="without its value"):
        merge_agent_args(line, PLAN)
    assert merge_agent_args(line, ()) == line.replace(PLAN_LINE + " ", "")


PLAIN = st.text(alphabet=st.sampled_from(list("abcxyz019-_=,./:") + ["é", "中"]), min_size=1, max_size=12)
TRICKY = st.text(alphabet=st.sampled_from(list("ab -=,.\t\"'\\") + ["é"]), max_size=12)
USER_WORD = st.one_of(
    st.sampled_from(["-cpu", "host", "-device", "virtio-rng-pci,id=rng9", "-smbios", "type=1,serial=x y",
                     "-global", "kvm-pit.lost_tick_policy=discard", "-name", "-netdev", "user,id=u0"]),
    PLAIN, TRICKY,
)


@st.composite
def written_word(draw, word):
    """One way a user may write `word` so that Proxmox's split gives it back."""
    def escaped(text):
        return "".join("\\" + c if c in " \t\n\r\f\v\"'\\" else c for c in text)
    styles = ["double"] + (["bare"] if word else []) + (["single"] if "'" not in word and "\\" not in word else [])
    style = draw(st.sampled_from(styles))
    if style == "double":
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if style == "single":
        return "'" + word + "'"
    return escaped(word)


@st.composite
def user_line(draw):
    user_words = draw(st.lists(USER_WORD, max_size=8))
    forms = [draw(written_word(word)) for word in user_words]
    blanks = [draw(st.sampled_from([" ", "  ", "\t", " \t "])) for _ in forms[1:]] + [""]
    line = "".join(form + blank for form, blank in zip(forms, blanks))
    assume(line != "0")
    assume(agent_args(line) == ())
    # An option that takes a value is followed by one (else QEMU refuses the line anyway).
    assume(not any(w in VALUED and (i + 1 == len(user_words) or user_words[i + 1] in VALUED)
                   for i, w in enumerate(user_words)))
    return user_words, forms, line


VALUED = {"-device", "-netdev"}


def insert_plan(user_words, forms, plan, at):
    """The user's written words with an old agent plan put in at position `at` (not inside a pair)."""
    while 0 < at < len(forms) and user_words[at - 1] in VALUED:
        at -= 1
    forms = list(forms)
    forms[at:at] = list(plan)
    return " ".join(forms)


@settings(max_examples=200, deadline=None)
@given(user_line(), st.sampled_from([(), PLAN, OTHER_PLAN]), st.sampled_from([(), PLAN, OTHER_PLAN]),
       st.integers(min_value=0, max_value=8))
def test_merge_keeps_user_args_and_replaces_only_the_agent_part(user, old, new, at):
    user_words, forms, line = user
    before = insert_plan(user_words, forms, old, min(at, len(forms))) if old else line
    merged = merge_agent_args(before, new)
    # Proxmox hands QEMU the user's words in order, then the new plan.
    assert proxmox_split(merged) == user_words + list(new)
    assert agent_args(merged) == new
    # Byte for byte: each user word is written as before, in the same order.
    assert written(merged)[:len(forms)] == forms
    # Merging the same plan again changes nothing; a new plan replaces only the agent's part.
    assert merge_agent_args(merged, new) == merged
    assert merge_agent_args(merge_agent_args(before, OTHER_PLAN), new) == merged
    if not old:
        assert merged.startswith(line)


# --- user args that clash with a plan ----------------------------------------------------

@pytest.mark.parametrize("user, named, reason", [
    ("-numa node,nodeid=0", "-numa node,nodeid=0", "NUMA node"),
    ("-object memory-backend-ram,id=ram,size=1G", "-object memory-backend-ram,id=ram,size=1G", "memory backend"),
    ("-object '{\"qom-type\":\"memory-backend-file\",\"id\":\"f\"}'", "memory-backend-file", "memory backend"),
    ("-machine memory-backend=mine", "-machine memory-backend=mine", "memory backend"),
    ("-M pc,memory-backend=mine", "-M pc,memory-backend=mine", "memory backend"),
    ("-m 4096", "-m 4096", "must match"),
    ("-mem-path /dev/hugepages", "-mem-path /dev/hugepages", "must match"),
    ("-device e1000,id=e,bus=pci.0,addr=0x13", "addr=0x13", "pci.0 slot 0x13, the slot of the agent's vhu-net1"),
    ("-device e1000,id=e,bus=pci.0,addr=13.0", "addr=13.0", "slot of the agent's vhu-net1"),
    ("-device e1000,id=e,addr=0x13", "addr=0x13", "slot of the agent's vhu-net1"),  # default bus pci.0
    ("-netdev type=vhost-user,id=mine,chardev=c", "type=vhost-user,id=mine", "hand-written vhost-user"),
    ("-nic vhost-user,chardev=c", "-nic vhost-user", "hand-written vhost-user"),
    ("-chardev socket,id=vhu-net40,path=/x", "id=vhu-net40", "reserved for pve-vhost-agent"),
    ("-device e1000,id=x,netdev=vhu-net1", "netdev=vhu-net1", "reserved for pve-vhost-agent"),
    ("-machine memory-backend=vhu-mem,accel=tcg", "memory-backend=vhu-mem,accel=tcg", "reserved"),
])
def test_user_args_that_clash_are_refused_naming_the_token(user, named, reason):
    with pytest.raises(ConfigConflict) as err:
        check_user_args("-cpu host " + user, PLAN, 100)
    assert named in str(err.value) and reason in str(err.value)
    assert str(err.value).startswith("VM 100 args have `")


@pytest.mark.parametrize("user", [
    "-cpu host -name 'my vm'",
    "-device e1000,id=e,bus=pci.0,addr=0x14",  # a free slot
    "-device e1000,id=e,bus=pci.1,addr=0x13",  # same slot number, other bus
    "-device e1000,id=e",  # no addr
    "-netdev user,id=u0",
    "-chardev socket,id=serial9,path=/run/x.sock,server=on,wait=off",
    PLAN_LINE,  # the agent's own old part never clashes
])
def test_user_args_that_do_not_clash_pass(user):
    check_user_args(user, PLAN, 100)


def test_memory_options_clash_only_when_the_plan_adds_memory():
    nic_only = OTHER_PLAN
    check_user_args("-m 4096 -mem-path /x", nic_only, 100)
    with pytest.raises(ConfigConflict, match="NUMA"):
        check_user_args("-numa node", nic_only, 100)


def test_q35_default_bus_is_pcie0():
    check_user_args("-device e1000,id=e,addr=0x13", PLAN, 100, root_bus="pcie.0")
    with pytest.raises(ConfigConflict):
        check_user_args("-device e1000,id=e,addr=0x13", PLAN, 100, root_bus="pci.0")
