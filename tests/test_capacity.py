"""Shared-memory capacity: pure table tests, then the real host readings (tmpfs, netlink)."""

import os
import subprocess
import uuid

import pytest

from pve_vhost_agent.capacity import (
    PAGE_1G_KIB, PAGE_2M_KIB, HostMemory, SharedMemoryNeed, capacity_problems, shared_memory_need,
)
from pve_vhost_agent.hostinfo import read_host_memory, read_links
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.vmlayout import memory_layout

GIB_KIB = 1024 * 1024


def host(available_gib=64, shm_gib=8, huge2m=0, huge1g=0):
    return HostMemory(available_gib * GIB_KIB, shm_gib * 1024**3, {PAGE_2M_KIB: huge2m, PAGE_1G_KIB: huge1g})


def test_need_follows_the_memory_layout():
    assert shared_memory_need(memory_layout({"memory": "4096"})) == SharedMemoryNeed("memfd", 4096)
    assert shared_memory_need(memory_layout({"memory": "4096", "numa": "1", "hugepages": "1024"})) == \
        SharedMemoryNeed("hugepages", 4096, PAGE_1G_KIB)
    assert shared_memory_need(memory_layout({"numa": "1", "hugepages": "any"})).page_kib is None


@pytest.mark.parametrize(
    "need, observed, words",
    [
        (SharedMemoryNeed("memfd", 8192), host(available_gib=4), "only 4096 MiB available"),
        (SharedMemoryNeed("shm-file", 16384), host(shm_gib=8), "enlarge it"),
        (SharedMemoryNeed("shm-file", 1024), HostMemory(GIB_KIB, None, {}), "no /dev/shm"),
        (SharedMemoryNeed("hugepages", 4096, PAGE_2M_KIB), host(huge2m=100), "needs 2048 free 2 MiB hugepages but 100"),
        (SharedMemoryNeed("hugepages", 4096, PAGE_1G_KIB), host(huge1g=3), "needs 4 free 1024 MiB hugepages"),
        (SharedMemoryNeed("hugepages", 3000, None), host(huge1g=8, huge2m=10), "2 MiB hugepages"),
    ],
)
def test_shortfalls_name_the_fix(need, observed, words):
    problems = capacity_problems(100, need, observed)
    assert len(problems) == 1 and words in problems[0] and problems[0].startswith("VM 100 needs")


@pytest.mark.parametrize(
    "need, observed",
    [
        (SharedMemoryNeed("memfd", 8192), host(available_gib=9)),
        (SharedMemoryNeed("shm-file", 8192), host(shm_gib=8)),
        (SharedMemoryNeed("hugepages", 4096, PAGE_2M_KIB), host(huge2m=2048)),
        (SharedMemoryNeed("hugepages", 4096, None), host(huge1g=4)),
        (SharedMemoryNeed("hugepages", 3000, None), host(huge1g=8, huge2m=1500)),
    ],
)
def test_enough_room_gives_no_problem(need, observed):
    assert capacity_problems(100, need, observed) == ()


def test_real_dev_shm_under_the_root_is_measured(tmp_path):
    shm = tmp_path / "dev" / "shm"
    shm.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "pve-vhost-agent-test", str(shm)], check=True)
    try:
        (shm / "filler").write_bytes(b"\0" * (16 * 1024 * 1024))
        observed = read_host_memory(Settings(root=tmp_path, node="n1"))
        assert 47 * 1024**2 <= observed.shm_free_bytes <= 48 * 1024**2
        assert observed.available_kib > 0
        problems = capacity_problems(100, SharedMemoryNeed("shm-file", 64), observed)
        assert problems and "only 48 MiB are free" in problems[0]
    finally:
        subprocess.run(["umount", str(shm)], check=True)


def test_no_dev_shm_under_the_root_reads_as_absent(tmp_path):
    assert read_host_memory(Settings(root=tmp_path, node="n1")).shm_free_bytes is None


def test_links_through_netlink_in_a_namespace():
    ns = f"pvatest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "pva-a", "mtu", "9000", "type", "veth",
                        "peer", "name", "pva-b"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "pva-a", "up"], check=True)
        links = read_links(ns)
        assert links["pva-a"].mtu == 9000 and links["pva-a"].kind == "veth" and links["pva-a"].up
        assert not links["pva-b"].up and links["lo"].kind == ""
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=True)
