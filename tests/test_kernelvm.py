"""The real-kernel harness itself (tests/fixtures/kernelvm.py) cannot pass silently.

A scratch test file, run by a nested pytest on the host: its junit xml read the way the
harness reads the guest's; then run through the harness into a guest, where every kind of
outcome (pass, fail, setup and teardown errors, skip, a test the guest never has, a guest
pytest that dies) must come back as that test's outcome on the host, a failure whenever
the test did not run and pass in the guest.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO
from fixtures.kernelvm import ENV, GuestOutcome, parse_junit

OUTCOMES = '''
import os
import unittest

import pytest


def test_passes():
    assert True


def test_fails():
    assert 6 * 7 == 41, "the guest says no"


@pytest.fixture
def broken():
    raise RuntimeError("a fixture broke in the guest")


def test_setup_error(broken):
    pass


@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("a teardown broke in the guest")


def test_teardown_error(broken_teardown):
    pass


class TestGroup:
    @pytest.mark.parametrize("n", [1, 2], ids=["one", "two"])
    def test_param(self, n):
        assert n == 1, f"n is {n}"


def test_skipped():
    raise unittest.SkipTest("not today")  # what a skip does; this project has none


@pytest.mark.xfail(reason="known to fail", strict=True)
def test_xfails():
    assert False


@pytest.mark.xfail(reason="expected to fail", strict=True)
def test_xpasses():
    pass
'''

IN_GUEST = '''

HOST_KERNEL = "@HOST_KERNEL@"


def test_runs_on_another_kernel():
    assert os.uname().release != HOST_KERNEL and "@ENV@" in os.environ


if "@ENV@" not in os.environ:  # collected on the host, absent in the guest
    def test_the_guest_does_not_have():
        pass
'''

DIES = '''
import os

import pytest

pytestmark = pytest.mark.real_kernel


def test_before():
    pass


def test_ends_the_guest_pytest():
    os._exit(3)


def test_after():
    pass
'''


@pytest.fixture
def scratch():
    folder = Path(tempfile.mkdtemp(prefix="h9kv-scratch-", dir="/tmp"))
    (folder / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\n")  # the plugin registers its marks
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def nested_pytest(folder: Path, *files: str) -> tuple[int, dict[str, tuple[str, str]]]:
    """Run pytest (with the harness plugin) on `files` in `folder`: its exit code and
    {test name: (outcome, text)} from its junit xml, read independently of the harness."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", ENV))}
    env.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", PYTHONPATH=str(REPO / "tests"), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "fixtures.kernelvm",
                             "-q", f"--junitxml={folder / 'host.xml'}", *files],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert (folder / "host.xml").exists(), f"nested pytest wrote no junit xml:\n{result.stdout}\n{result.stderr}"
    outcomes = {}
    for case in ET.parse(folder / "host.xml").iter("testcase"):
        kinds = [(child.tag, f"{child.get('message', '')}\n{child.text or ''}") for child in case
                 if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = kinds[-1] if kinds else ("passed", "")
    return result.returncode, outcomes


def test_the_junit_xml_of_a_real_pytest_run_gives_each_tests_outcome(scratch):
    (scratch / "test_outcomes.py").write_text(OUTCOMES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--junitxml=out.xml",
                    "test_outcomes.py"], cwd=scratch, env=env, capture_output=True, timeout=120,
                   stdin=subprocess.DEVNULL)
    results = parse_junit((scratch / "out.xml").read_text())
    seen = {name: results.get(f"test_outcomes.py::{name}") for name in (
        "test_passes", "test_fails", "test_setup_error", "test_teardown_error", "TestGroup::test_param[one]",
        "TestGroup::test_param[two]", "test_skipped", "test_xfails")}
    assert seen["test_passes"] == GuestOutcome() and seen["TestGroup::test_param[one]"] == GuestOutcome()
    assert "the guest says no" in seen["test_fails"].failure
    assert "n is 2" in seen["TestGroup::test_param[two]"].failure
    assert "a fixture broke in the guest" in seen["test_setup_error"].setup_error
    assert seen["test_teardown_error"].failure is None
    assert "a teardown broke in the guest" in seen["test_teardown_error"].teardown_error
    assert seen["test_skipped"].skipped == "not today"
    assert seen["test_xfails"].xfailed == "known to fail"
    assert results.get("test_outcomes.py::test_not_there") is None


@pytest.mark.slow
def test_every_outcome_in_the_guest_comes_back_and_what_did_not_run_fails(scratch):
    (scratch / "test_outcomes.py").write_text(
        OUTCOMES + "\npytestmark = pytest.mark.real_kernel\n"
        + IN_GUEST.replace("@HOST_KERNEL@", os.uname().release).replace("@ENV@", ENV))
    (scratch / "test_dies.py").write_text(DIES)
    code, seen = nested_pytest(scratch, "test_outcomes.py", "test_dies.py")
    assert code == 1
    assert seen.pop("test_passes") == ("passed", "")
    assert seen.pop("test_param[one]") == ("passed", "")
    assert seen.pop("test_runs_on_another_kernel") == ("passed", "")
    assert seen.pop("test_before")[0] == "failure"  # its guest's pytest died: no results at all
    assert seen.pop("test_xfails")[0] == "skipped"  # xfailed in the guest, as on the host
    not_run = "did not run (or finish) in the guest"
    expected = {  # test: (host outcome, text it must show)
        "test_fails": ("failure", "the guest says no"),
        "test_xpasses": ("failure", "XPASS(strict)"),
        "test_param[two]": ("failure", "n is 2"),
        "test_setup_error": ("error", "a fixture broke in the guest"),
        "test_teardown_error": ("error", "a teardown broke in the guest"),
        "test_skipped": ("failure", "skipped in the guest"),
        "test_the_guest_does_not_have": ("failure", f"{not_run} (the guest's pytest exited 1)"),
        "test_ends_the_guest_pytest": ("failure", f"{not_run} (the guest's pytest exited 3)"),
        "test_after": ("failure", not_run),
    }
    assert {name: kind for name, (kind, _) in seen.items()} == {name: kind for name, (kind, _) in expected.items()}
    for name, (_, text) in expected.items():
        assert text in seen[name][1] and "[in the guest: Debian bookworm, kernel " in seen[name][1], (name, seen[name])
