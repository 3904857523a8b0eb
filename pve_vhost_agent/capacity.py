"""Is there room on this host for a VM's shared guest memory? Pure: needs + observed in.

A vhost-user VM's memory is shared with the switch and cannot be ballooned or swapped
out by KSM-style tricks, so pre-start checks up front that the host can hold all of it,
instead of letting the guest die of SIGBUS (a full /dev/shm) or the OOM killer later.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from pve_vhost_agent.vmlayout import MemoryLayout

PAGE_2M_KIB = 2048
PAGE_1G_KIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class SharedMemoryNeed:
    """Where the VM's shared memory comes from and how much of it there is."""

    kind: str  # "memfd" (anonymous shared memory), "shm-file" (/dev/shm) or "hugepages"
    mib: int
    page_kib: int | None = None  # hugepages only; None for "any"


@dataclasses.dataclass(frozen=True)
class HostMemory:
    """Observed host capacity (see hostinfo.read_host_memory)."""

    available_kib: int  # MemAvailable
    shm_free_bytes: int | None  # free space of the /dev/shm tmpfs, None when absent
    hugepages_free: Mapping[int, int]  # page size in KiB -> free pages


def shared_memory_need(layout: MemoryLayout) -> SharedMemoryNeed:
    """The shared memory a vhost-user VM with this layout gets (argsplan's memory rule)."""
    if layout.numa and layout.hugepages:
        page = {"2": PAGE_2M_KIB, "1024": PAGE_1G_KIB}.get(layout.hugepages)
        return SharedMemoryNeed("hugepages", layout.memory_mib, page)
    return SharedMemoryNeed("memfd", layout.memory_mib)


def capacity_problems(vmid: int, need: SharedMemoryNeed, host: HostMemory) -> tuple[str, ...]:
    """One line per shortfall, each naming the problem and the fix; empty when it fits."""
    need_kib = need.mib * 1024
    if need.kind == "memfd":
        if host.available_kib < need_kib:
            return (
                f"VM {vmid} needs {need.mib} MiB of shared memory but the host has only "
                f"{host.available_kib // 1024} MiB available; free memory or lower the VM's memory",
            )
        return ()
    if need.kind == "shm-file":
        if host.shm_free_bytes is None:
            return (f"VM {vmid} needs {need.mib} MiB in /dev/shm but there is no /dev/shm; mount a tmpfs there",)
        if host.shm_free_bytes < need_kib * 1024:
            return (
                f"VM {vmid} needs {need.mib} MiB in /dev/shm but only "
                f"{host.shm_free_bytes // (1024 * 1024)} MiB are free there; enlarge it "
                f"(mount -o remount,size=<size> /dev/shm, and in /etc/fstab)",
            )
        return ()
    sizes = [need.page_kib] if need.page_kib else [PAGE_1G_KIB, PAGE_2M_KIB]
    for page in sizes:
        if need_kib % page == 0 and host.hugepages_free.get(page, 0) * page >= need_kib:
            return ()
    page = need.page_kib or PAGE_2M_KIB
    free = host.hugepages_free.get(page, 0)
    return (
        f"VM {vmid} needs {need_kib // page} free {page // 1024} MiB hugepages but {free} are free; "
        f"reserve more (sysctl vm.nr_hugepages, or hugepagesz=/hugepages= on the kernel command line)",
    )
