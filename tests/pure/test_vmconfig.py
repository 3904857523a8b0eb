"""VM config text: every byte survives, and an edit touches exactly one line."""

import difflib
import re

import pytest
from hypothesis import given, settings, strategies as st

from pve_vhost_agent.errors import ConfigConflict
from pve_vhost_agent.formats.vmconfig import VmConfig

from conftest import PEER

CORPUS = sorted((PEER / "qemu-server-cfg2cmd").glob("*.conf"))
ARGS = "-chardev socket,id=vhu0,path=/run/x.sock,server=on,wait=off -netdev type=vhost-user,id=n0,chardev=vhu0"

HAND_WRITTEN = """\
#Router%3A edge one
#  second line with 100%25 certainty
agent: 1
balloon: 0
memory: 2048
name: edge
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=10
net1: virtio=BC:24:11:00:00:02,bridge=vmbr1
numa: 0
parent: before-upgrade
scsi0: local-lvm:vm-100-disk-0,size=8G

[PENDING]
delete: net1,!balloon
memory: 4096
net2: virtio=BC:24:11:00:00:03,bridge=vmbr2

[special:cloudinit]
ipconfig0: ip=dhcp
name: edge

[before-upgrade]
#old description
memory: 1024
name: edge
snaptime: 1748933042
"""


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"]


@pytest.mark.peer
def test_corpus_is_there():
    # The peer corpus is the real-world input: a missing folder must not pass silently.
    assert len(CORPUS) > 90


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus_writes_back_byte_identical(path):
    raw = path.read_bytes().decode()
    assert VmConfig.parse(raw).text.encode() == path.read_bytes()


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_setting_args_changes_only_the_args_line_and_removing_it_restores_the_bytes(path):
    raw = path.read_text()
    config = VmConfig.parse(raw)
    with_args = config.with_value("args", ARGS)
    assert changed_lines(raw, with_args.text) == [f"+ args: {ARGS}"]
    assert with_args.effective()["args"] == ARGS
    assert with_args.sections() == config.sections()
    assert with_args.with_value("args", None).text == raw


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_pending_args_round_trip(path):
    raw = path.read_text()
    pending = VmConfig.parse(raw).with_value("args", ARGS, "pending")
    assert pending.section("pending") == {"args": ARGS}
    assert pending.section("main") == VmConfig.parse(raw).section("main")
    assert pending.with_value("args", None, "pending").text == raw


def test_new_key_goes_in_alphabetical_place_as_proxmox_writes_it():
    config = VmConfig.parse("boot: order=scsi0\ncores: 2\nmemory: 512\n")
    assert config.with_value("args", "-x").text == "args: -x\nboot: order=scsi0\ncores: 2\nmemory: 512\n"
    assert config.with_value("hookscript", "local:snippets/h").text == (
        "boot: order=scsi0\ncores: 2\nhookscript: local:snippets/h\nmemory: 512\n")
    assert config.with_value("vga", "std").text.endswith("memory: 512\nvga: std\n")


def test_hand_written_config_sections_and_effective_view():
    config = VmConfig.parse(HAND_WRITTEN)
    assert config.text == HAND_WRITTEN
    assert config.sections() == ["main", "pending", "special:cloudinit", "snapshot:before-upgrade"]
    assert config.pending_delete == ("net1", "balloon")
    assert config.section("snapshot:before-upgrade")["memory"] == "1024"
    assert config.section("special:cloudinit") == {"ipconfig0": "ip=dhcp", "name": "edge"}
    effective = config.effective()
    assert effective["memory"] == "4096"  # the next start uses the pending value
    assert "net1" not in effective and "balloon" not in effective
    assert effective["net2"].endswith("bridge=vmbr2")
    assert "delete" not in effective


def test_hand_written_config_keeps_every_other_line_when_args_change():
    config = VmConfig.parse(HAND_WRITTEN)
    main = config.with_value("args", "-a")
    assert changed_lines(HAND_WRITTEN, main.text) == ["+ args: -a"]
    assert main.text.index("args: -a") < main.text.index("balloon: 0")
    pending = config.with_value("args", "-b", "pending")
    assert changed_lines(HAND_WRITTEN, pending.text) == ["+ args: -b"]
    assert pending.text.index("[PENDING]\nargs: -b\ndelete:") > 0
    replaced = main.with_value("args", "-c")
    assert changed_lines(main.text, replaced.text) == ["- args: -a", "+ args: -c"]
    assert replaced.with_value("args", None).text == HAND_WRITTEN


def test_pending_section_is_created_after_main_and_removed_when_empty():
    raw = "memory: 512\n\n[snap1]\nmemory: 256\n"
    config = VmConfig.parse(raw).with_value("args", "-x", "pending")
    assert config.text == "memory: 512\n\n[PENDING]\nargs: -x\n\n[snap1]\nmemory: 256\n"
    assert config.section("snapshot:snap1") == {"memory": "256"}
    assert config.effective() == {"memory": "512", "args": "-x"}
    assert config.with_value("args", None, "pending").text == raw


def test_missing_final_newline_is_kept():
    raw = "memory: 512"
    config = VmConfig.parse(raw)
    assert config.text == raw
    assert config.with_value("args", "-x").text == "args: -x\nmemory: 512"
    assert config.with_value("numa", "0").text == "memory: 512\nnuma: 0"
    assert config.with_value("numa", "0").with_value("numa", None).text == raw
    assert config.with_value("args", "-x", "pending").with_value("args", None, "pending").text == raw


def test_repeated_key_the_last_value_counts_and_a_change_leaves_one_line():
    config = VmConfig.parse("args: -old\nmemory: 512\nargs: -newer\n")
    assert config.section()["args"] == "-newer"
    assert config.with_value("args", "-x").text == "memory: 512\nargs: -x\n"
    assert config.with_value("args", None).text == "memory: 512\n"


def test_lines_proxmox_cannot_parse_are_kept_and_ignored():
    raw = "memory: 512\nNot A Key Line\ndelete: net0\n  \n"
    config = VmConfig.parse(raw)
    assert config.section() == {"memory": "512"}  # `delete:` counts only in [PENDING]
    assert config.with_value("args", "-x").text == "args: -x\n" + raw


def test_empty_file_gets_a_terminated_line():
    assert VmConfig.parse("").with_value("args", "-x").text == "args: -x\n"


@pytest.mark.parametrize("key", ["Args", "delete", "description"])
def test_keys_the_agent_never_writes_are_a_bug_to_ask_for(key):
    with pytest.raises(ValueError):
        VmConfig.parse("memory: 512\n").with_value(key, "-x")


@pytest.mark.parametrize("value, words", [
    ("a\nb", "control character (U+000A) at character 2"), ("-a\rb", "control character (U+000D) at character 3"),
    ("-x \x1b[2J", "(U+001B)"), ("-x\x7f", "(U+007F)"), (" -x", "blanks at its ends"), ("-x\t", "blanks at its ends"),
    ("", "empty"),
])
def test_values_that_would_not_read_back_are_the_vms_conflict_with_the_fix(value, words):
    # A user's args with a carriage return made this a plain ValueError: a traceback from
    # `apply`, `nic add` and `status`, and a failed pass of the service for every VM.
    with pytest.raises(ConfigConflict, match=re.escape(words)) as caught:
        VmConfig.parse("memory: 512\n").with_value("args", value)
    assert "qm set VMID --args" in str(caught.value)


def test_a_tab_inside_a_value_is_kept():
    assert VmConfig.parse("").with_value("args", "-a\tb").text == "args: -a\tb\n"


# Bodies made of config-like lines, headers, comments, blanks and junk.
_LINE = st.one_of(
    st.from_regex(r"[a-z]{1,8}[0-9]?: [ -~]{0,20}", fullmatch=True),
    st.sampled_from(["[PENDING]", "[special:cloudinit]", "[snap1]", "[SNAP_2]", "", "  ", "#", "delete: a,b"]),
    st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=30),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, max_size=25), final_newline=st.booleans())
def test_arbitrary_bodies_round_trip_and_args_edits_are_reversible(lines, final_newline):
    raw = "\n".join(lines) + ("\n" if final_newline and lines else "")
    config = VmConfig.parse(raw)
    assert config.text == raw
    for section in ("main", "pending"):
        if "args" in config.section(section):
            continue
        if section == "pending" and "pending" in config.sections() and not config.section("pending"):
            continue  # a [PENDING] without keys is dropped once it is empty again, as Proxmox would
        edited = config.with_value("args", "-x y", section)
        assert edited.section(section)["args"] == "-x y"
        assert edited.with_value("args", None, section).text == raw


def test_pending_delete_entries_come_and_go_like_qm_set_writes_them():
    raw = "memory: 512\n\n[PENDING]\ndelete: numa,!args,vga\nmemory: 1024\n"
    config = VmConfig.parse(raw)
    dropped = config.with_pending_delete("args", False)
    assert dropped.text == "memory: 512\n\n[PENDING]\ndelete: numa,vga\nmemory: 1024\n"
    assert dropped.with_pending_delete("args", False) is dropped
    assert VmConfig.parse("memory: 512\n\n[PENDING]\ndelete: args\n").with_pending_delete("args", False).text == \
        "memory: 512\n"
    added = VmConfig.parse("memory: 512\n").with_pending_delete("args", True)
    assert added.text == "memory: 512\n\n[PENDING]\ndelete: args\n" and added.pending_delete == ("args",)
    assert added.with_pending_delete("args", False).text == "memory: 512\n"
    assert VmConfig.parse("memory: 512\n\n[PENDING]\nmemory: 1024\n").with_pending_delete("args", True).text == \
        "memory: 512\n\n[PENDING]\ndelete: args\nmemory: 1024\n"
