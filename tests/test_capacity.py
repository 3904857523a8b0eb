"""Shared-memory capacity warnings: pure table tests, then the real host readings (netlink)."""

import subprocess
import uuid

import pytest

from pve_vhost_agent.plan.capacity import (
    PAGE_1G_KIB, PAGE_2M_KIB, HostMemory, SharedMemoryNeed, capacity_warnings, shared_memory_need,
)
from pve_vhost_agent.adapters.host import read_host_memory, read_links
from pve_vhost_agent.formats.vmlayout import memory_layout

GIB_KIB = 1024 * 1024


def host(available_gib=64, huge2m=0, huge1g=0):
    return HostMemory(available_gib * GIB_KIB, {PAGE_2M_KIB: huge2m, PAGE_1G_KIB: huge1g})


def test_need_follows_the_memory_layout():
    assert shared_memory_need(memory_layout({"memory": "4096"})) == SharedMemoryNeed("memfd", 4096)
    assert shared_memory_need(memory_layout({"memory": "4096", "numa": "1", "hugepages": "1024"})) == \
        SharedMemoryNeed("hugepages", 4096, PAGE_1G_KIB)
    assert shared_memory_need(memory_layout({"numa": "1", "hugepages": "any"})).page_kib is None


@pytest.mark.parametrize(
    "need, observed, words",
    [
        (SharedMemoryNeed("memfd", 8192), host(available_gib=4), "only 4096 MiB available"),
        (SharedMemoryNeed("hugepages", 4096, PAGE_2M_KIB), host(available_gib=1, huge2m=100),
         "needs 2048 2 MiB hugepages but 100 are free and only 1024 MiB"),
        (SharedMemoryNeed("hugepages", 4096, PAGE_1G_KIB), host(available_gib=0, huge1g=3), "needs 4 1024 MiB hugepages"),
        (SharedMemoryNeed("hugepages", 3000, None), host(available_gib=0, huge1g=8, huge2m=10), "2 MiB hugepages"),
    ],
)
def test_likely_shortfalls_are_warned_with_the_fix(need, observed, words):
    warnings = capacity_warnings(100, need, observed)
    assert len(warnings) == 1 and words in warnings[0] and warnings[0].startswith("VM 100 ")


@pytest.mark.parametrize(
    "need, observed",
    [
        (SharedMemoryNeed("memfd", 8192), host(available_gib=9)),
        (SharedMemoryNeed("hugepages", 4096, PAGE_2M_KIB), host(available_gib=0, huge2m=2048)),
        (SharedMemoryNeed("hugepages", 4096, None), host(available_gib=0, huge1g=4)),
        (SharedMemoryNeed("hugepages", 3000, None), host(available_gib=0, huge1g=8, huge2m=1500)),
        # No hugepages reserved (nr_hugepages=0 is normal): qemu-server reserves them after pre-start.
        (SharedMemoryNeed("hugepages", 4096, PAGE_2M_KIB), host(available_gib=8)),
        (SharedMemoryNeed("hugepages", 4096, PAGE_1G_KIB), host(available_gib=3, huge1g=1)),
    ],
)
def test_room_proxmox_can_use_gives_no_warning(need, observed):
    assert capacity_warnings(100, need, observed) == ()


def test_host_memory_is_read_from_proc_and_sysfs():
    observed = read_host_memory()
    assert observed.available_kib > 0
    assert all(size in (PAGE_2M_KIB, PAGE_1G_KIB) or size > 0 for size in observed.hugepages_free)


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
