"""The agent's logging: structured entries in a real journald, short guarded human lines."""

import io
import logging
import subprocess
import textwrap
import uuid

import pytest

from pve_vhost_agent.adapters.journal import (
    context_logger,
    guard_text,
    setup_logging,
)

from conftest import REPO


@pytest.fixture
def human():
    """The root logger writing human lines to a buffer; restored afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    stream = io.StringIO()
    try:
        yield stream
    finally:
        setup_logging(journal=False, human_stream=None)
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


def test_migration_line_is_never_emitted(human):
    setup_logging(journal=False, human_stream=human)
    log = logging.getLogger("pve_vhost_agent.test")
    log.info("migration listens on tcp:10.0.0.1:60000")
    log.warning("Migration listens on unix:/run/qemu-server/100.migrate")
    log.info("port ready\nmigration listens on tcp:[::1]:1")
    lines = human.getvalue().splitlines()
    assert lines == [
        "pve-vhost-agent: migration listens on tcp:10.0.0.1:60000",
        "WARN: Migration listens on unix:/run/qemu-server/100.migrate",
        # one line per record: the newline is gone, so no line starts with the prefix
        "port ready migration listens on tcp:[::1]:1",
    ]
    assert guard_text("a\nmigration listens on x") == "a\npve-vhost-agent: migration listens on x"


def test_human_lines_are_short_and_flag_problems(human):
    setup_logging(journal=False, human_stream=human)
    log = context_logger(logging.getLogger("pve_vhost_agent.test"), vmid=100, phase="pre-start")
    log.info("created port %s", "vhu100i0")
    log.error("OVS is down")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("apply failed")
    assert human.getvalue().splitlines() == [
        "created port vhu100i0",
        "ERROR: OVS is down",
        "ERROR: apply failed: boom second line",
    ]


def test_setup_twice_does_not_duplicate_lines(human):
    setup_logging(journal=False, human_stream=human)
    setup_logging(journal=False, human_stream=human)
    logging.getLogger("pve_vhost_agent.test").info("once")
    assert human.getvalue() == "once\n"


def test_missing_journald_is_reported(human, tmp_path):
    attached = setup_logging(journal=True, human_stream=human, socket_path=str(tmp_path / "socket"))
    assert attached is False
    assert human.getvalue() == (
        f"WARN: journald socket {tmp_path / 'socket'} is missing: log entries go only to this output\n"
    )


# Runs inside the private journald's mount namespace, as a hook would on a host.
SENDER = textwrap.dedent(
    """
    import logging, sys
    sys.path.insert(0, {repo!r})
    from pve_vhost_agent.adapters.journal import context_logger, setup_logging
    from pve_vhost_agent.flows.apply import report
    from pve_vhost_agent.model.actions import AddVhostPort, DelPort
    from pve_vhost_agent.model.ovs import PortVlan
    print("attached", setup_logging(journal=True, human_stream=sys.stdout, level=logging.DEBUG))
    base = logging.getLogger("pve_vhost_agent.flows.hook")
    log = context_logger(base, vmid={vmid}, phase="pre-start")
    log.debug("looking at VM {vmid}")
    log.warning("memory is tight", extra={{"nic": "net1"}})
    tunnel = PortVlan("dot1q-tunnel", 950, (), (10, 20), "802.1ad")
    report(log, AddVhostPort("vhu{vmid}i1", "br-vhost", {vmid}, "net1", "/run/x/vm-{vmid}-1.sock", tunnel), "done", 12)
    report(log, DelPort("vhu{vmid}i2", "", {vmid}), "skipped: the VM is busy", None, logging.ERROR)
    context_logger(base, vmid={other}, phase="post-stop").info("other VM")
    """
)


def send_entries(journald, vmid: int, other: int) -> subprocess.CompletedProcess:
    script = SENDER.format(repo=str(REPO), vmid=vmid, other=other)
    return journald.run(["/usr/bin/python3", "-c", script], capture_output=True, text=True, timeout=60)


def test_entries_land_in_journald_with_structured_fields(journald):
    vmid = 100_000 + uuid.uuid4().int % 800_000_000  # unique in the shared journal
    other = vmid + 1
    result = send_entries(journald, vmid, other)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "attached True"

    entries = journald.entries("SYSLOG_IDENTIFIER=pve-vhost-agent", f"VMID={vmid}", count=4)
    added_text = f"add vhost-user port vhu{vmid}i1 on br-vhost: S-tag 950 (802.1ad), C-VLANs 10,20"
    assert [e["MESSAGE"] for e in entries] == [
        f"looking at VM {vmid}", "memory is tight", added_text,
        f"remove vhost-user port vhu{vmid}i2 from Open vSwitch: skipped: the VM is busy",
    ]
    debug, warning, added, failed = entries
    assert {e["PHASE"] for e in entries} == {"pre-start"}
    assert (debug["PRIORITY"], warning["PRIORITY"], added["PRIORITY"], failed["PRIORITY"]) == ("7", "4", "6", "3")
    assert "ACTION" not in warning and "PORT" not in warning and warning["NIC"] == "net1"
    # The details are fields, never a repr in the message.
    assert {k: added[k] for k in ("NIC", "PORT", "BRIDGE", "ACTION", "RESULT", "DURATION_MS", "SOCKET", "VLAN_MODE",
                                  "TAG", "CVLANS", "QINQ_ETHTYPE")} == {
        "NIC": "net1", "PORT": f"vhu{vmid}i1", "BRIDGE": "br-vhost", "ACTION": "AddVhostPort", "RESULT": "done",
        "DURATION_MS": "12", "SOCKET": f"/run/x/vm-{vmid}-1.sock", "VLAN_MODE": "dot1q-tunnel", "TAG": "950",
        "CVLANS": "10,20", "QINQ_ETHTYPE": "802.1ad"}
    assert (failed["ACTION"], failed["RESULT"]) == ("DelPort", "skipped: the VM is busy")
    assert "BRIDGE" not in failed and "DURATION_MS" not in failed
    # The other VM's entry is not part of this VM's story, but is in the journal.
    assert [e["MESSAGE"] for e in journald.entries(f"VMID={other}")] == ["other VM"]
    # The same lines reached the human stream (the task log), each once.
    assert result.stdout.splitlines()[1:] == [
        f"looking at VM {vmid}",
        "WARN: memory is tight",
        added_text,
        f"ERROR: remove vhost-user port vhu{vmid}i2 from Open vSwitch: skipped: the VM is busy",
        "other VM",
    ]


