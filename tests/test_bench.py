"""bench/run must not rot: its smoke mode runs and prints well-formed figure lines.

Nothing here judges a figure (the bench prints figures, never asserts on them); only the
shape of each JSON line is checked.
"""

import json
import os
import subprocess

import pytest

from conftest import REPO

BENCH = REPO / "bench" / "run"
ENV = {**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def figures(*only: str, timeout: float) -> list[dict]:
    argv = [str(BENCH), "--quick", *(["--only", ",".join(only)] if only else [])]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    for line in lines:
        assert list(line)[:4] == ["name", "value", "unit", "baseline"], line
        assert isinstance(line["unit"], str) and line["unit"]
        assert line["value"] is None or isinstance(line["value"], (int, float)), line
        assert line["baseline"] is None or isinstance(line["baseline"], (int, float)), line
    assert "done, everything stopped" in result.stderr
    return lines


def test_the_hook_figures_of_the_smoke_mode():
    lines = figures("hook_prestart_s", timeout=120)
    assert [(line["name"], line["ports"]) for line in lines if "declared_nics" not in line] == [
        ("hook_prestart_s", 0), ("hook_prestart_s", 40)]
    declared = [line for line in lines if "declared_nics" in line]
    assert len(declared) == 1 and declared[0]["declared_nics"] == 400
    assert all(isinstance(line["value"], float) and isinstance(line["baseline"], float) for line in lines)
    # The floor beside the baseline: one of its ovs-vsctl calls (one reconfiguration each).
    assert all(isinstance(line["one_call_s"], float) and line["one_call_runs"] >= 4
               for line in lines if "declared_nics" not in line)


@pytest.mark.slow
def test_every_figure_of_the_smoke_mode():
    lines = figures(timeout=600)
    names = {line["name"] for line in lines}
    assert names == {"python_start_s", "hook_prestart_s", "hook_prestart_cpu_s", "boot_storm", "boot_storm_max_wall_s",
                     "reconcile_cold_s", "reconcile_noop_s", "idle_cpu_percent", "idle_rss_mib"}
    for line in lines:
        assert {"ports", "vms", "declared_nics"} & set(line) or line["name"] == "python_start_s", line
