"""Is there room on this host for a VM's shared guest memory? Pure: needs + observed in.

Only ever a warning, never a refusal: Proxmox itself starts a VM whatever memory is
free, and does not fail silently where it matters. A memfd backend is allocated as the
guest touches it (like Proxmox's own RAM); hugepages are reserved by qemu-server after
pre-start (`hugepages_allocate` raises `nr_hugepages`, so 0 reserved pages is normal),
and it aborts the start with "hugepage allocation failed" if the kernel cannot give them.
The warning says early, in the task log, that this start is likely to end badly.
"""

from __future__ import annotations

import dataclasses

from pve_vhost_agent.formats.vmlayout import MemoryLayout
from pve_vhost_agent.model.host import HostMemory

PAGE_2M_KIB = 2048
PAGE_1G_KIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class SharedMemoryNeed:
    """Where the VM's shared memory comes from and how much of it there is."""

    kind: str  # "memfd" (anonymous shared memory) or "hugepages"
    mib: int
    page_kib: int | None = None  # hugepages only; None for "any"



def shared_memory_need(layout: MemoryLayout) -> SharedMemoryNeed:
    """The shared memory a vhost-user VM with this layout gets (argsplan's memory rule)."""
    if layout.numa and layout.hugepages:
        page = {"2": PAGE_2M_KIB, "1024": PAGE_1G_KIB}.get(layout.hugepages)
        return SharedMemoryNeed("hugepages", layout.memory_mib, page)
    return SharedMemoryNeed("memfd", layout.memory_mib)


def capacity_warnings(vmid: int, need: SharedMemoryNeed, host: HostMemory) -> tuple[str, ...]:
    """One line per likely shortfall, naming it and the fix; empty when it should fit."""
    need_kib = need.mib * 1024
    if need.kind == "memfd":
        if host.available_kib < need_kib:
            return (
                f"VM {vmid} gets {need.mib} MiB of shared guest memory but the host has only "
                f"{host.available_kib // 1024} MiB available; the guest may be killed when it uses it all: "
                "free memory or lower the VM's memory",
            )
        return ()
    sizes = [need.page_kib] if need.page_kib else [PAGE_1G_KIB, PAGE_2M_KIB]
    for page in sizes:
        # Free pages plus what the kernel can still turn into pages (qemu-server reserves them).
        if need_kib % page == 0 and host.hugepages_free.get(page, 0) * page + host.available_kib >= need_kib:
            return ()
    page = need.page_kib or PAGE_2M_KIB
    free = host.hugepages_free.get(page, 0)
    return (
        f"VM {vmid} needs {need_kib // page} {page // 1024} MiB hugepages but {free} are free and only "
        f"{host.available_kib // 1024} MiB of memory is available to reserve more, so Proxmox will likely fail "
        "with 'hugepage allocation failed'; free memory or reserve hugepages at boot "
        "(hugepagesz=/hugepages= on the kernel command line)",
    )
