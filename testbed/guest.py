"""A tiny real guest: Debian's kernel and busybox in a made-up initramfs (no pytest).

For the data-path tests (tests/fixtures/guest.py boots it) and the demo. The kernel (the
package `linux-image-amd64` depends on) and `busybox-static` are fetched with `apt-get
download` (never installed), unpacked with `dpkg-deb -x`, and packed with an /init script
into an initramfs (cpio newc, written here). The init:

1. loads virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
   failover net_failover virtio_net (the order comes from the modules' own `depends=`),
   and 8021q with its dependencies when a VLAN is asked for;
2. puts `guest.addr` on `guest.dev` (eth0 unless told otherwise: the first virtio-net
   device by PCI slot), or on <dev>.<guest.vlan>;
3. pings `guest.peer` until the first reply, for at most `guest.timeout` seconds;
4. prints REPLY or NO_REPLY on the serial console, then, after a reply, keeps pinging
   while the peer answers (at most `guest.hold` s): the test looks at OVS meanwhile and
   ends the hold by silencing the peer; then RELEASED, and the guest powers off.

The built image is cached in /var/cache/pve-vhost-agent-tests/, keyed by the package
versions and a digest of what this file puts in it: only the first run downloads (~70 MB).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import gzip
import lzma
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable

CACHE = Path("/var/cache/pve-vhost-agent-tests")
PREFIX = "h7gu"
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
NET_MODULES = ("virtio_pci", "virtio_net")  # dependencies are resolved and loaded first
VLAN_MODULES = ("8021q",)
TIMEOUT = 300  # seconds for apt-get and dpkg-deb

MARK = "pve-vhost-agent-guest:"
READY, REPLY, NO_REPLY, RELEASED = (f"{MARK} {word}" for word in ("ready", "reply", "no-reply", "released"))

# QEMU 7.2 under TCG segfaults when a guest driver starts a vhost-user virtio-net device
# with MSI-X (test-machine.md). A property of this test machine, not of Proxmox hosts:
# only the test launcher adds it, never the agent's args.
TEST_MACHINE_ONLY = ("-global", "virtio-net-pci.vectors=0")

# The start of every /init of the test guests (this one, linkguest's): busybox set up, the
# console as output, and the helpers: `say` prints a line starting with the guest's mark,
# `now` is the uptime in seconds, `load NAME` loads the modules of /modules/NAME.order
# (those not loaded yet). Each init defines `off` (power off) itself.
PRELUDE = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
say() { echo "@MARK@ $*"; }
now() { cut -d. -f1 /proc/uptime; }
load() {
  for m in $(cat "/modules/$1.order"); do
    grep -q "^$m " /proc/modules || insmod "/modules/$m.ko" || say "insmod $m failed"
  done
}
"""

INIT = (PRELUDE + r"""off() { sync; poweroff -f; }

timeout=30 hold=60 vlan= nic=eth0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    guest.dev=*) nic=${arg#*=} ;;
    guest.addr=*) addr=${arg#*=} ;;
    guest.peer=*) peer=${arg#*=} ;;
    guest.vlan=*) vlan=${arg#*=} ;;
    guest.timeout=*) timeout=${arg#*=} ;;
    guest.hold=*) hold=${arg#*=} ;;
  esac
done

load net
ip link set lo up
ip link set "$nic" up || { say "no $nic"; off; }
dev=$nic
if [ -n "$vlan" ]; then
  load vlan
  dev=$nic.$vlan
  ip link add link "$nic" name "$dev" type vlan id "$vlan" && ip link set "$dev" up || { say "no $dev"; off; }
fi
ip addr add "$addr" dev "$dev"
say "ready $dev $addr uptime $(cat /proc/uptime)"

end=$(( $(now) + timeout )) tries=0
until ping -c 1 -W 1 "$peer" >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$(now)" -ge "$end" ]; then
    say "no-reply from $peer after $tries pings"
    grep -E "$nic" /proc/net/dev
    off
  fi
  sleep 0.2
done
say "reply from $peer after $tries unanswered pings, uptime $(cat /proc/uptime)"
end=$(( $(now) + hold ))
while [ "$(now)" -lt "$end" ] && ping -c 1 -W 1 "$peer" >/dev/null 2>&1; do sleep 0.2; done
say "released uptime $(cat /proc/uptime)"
off
""").replace("@MARK@", MARK)


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    label: str  # the package versions it was built from


def kernel_command_line(addr: str, peer: str, *, vlan: int | None = None, timeout: int = 30, hold: int = 60,
                        dev: str = "eth0") -> str:
    """`-append` for a guest that puts `addr` (CIDR) on `dev` or <dev>.<vlan> and pings `peer`."""
    parts = ["console=ttyS0", "quiet", "panic=-1", "ipv6.disable=1",  # no IPv6 chatter on the wire
             # A TCG vCPU starved by a busy host fails the kernel's boot-time check that the
             # IO-APIC timer ticks ("IO-APIC + timer doesn't work!", a panic): skip that check.
             "no_timer_check",
             f"guest.addr={addr}", f"guest.peer={peer}", f"guest.timeout={timeout}", f"guest.hold={hold}"]
    if dev != "eth0":
        parts.append(f"guest.dev={dev}")
    if vlan is not None:
        parts.append(f"guest.vlan={vlan}")
    return " ".join(parts)


def console_marker(console: str, *markers: str) -> str | None:
    """The first line of a guest's serial console that starts with one of `markers`."""
    return next((line for line in console.splitlines() if line.startswith(markers)), None)


# --- building it ---------------------------------------------------------------------


class _NotDownloaded(RuntimeError):
    pass


def build_image(cache: Path) -> GuestImage:
    """The cached image for the current candidate package versions, built on first use."""
    try:
        return _build_image(cache)
    except _NotDownloaded:
        # Package lists older than the mirror (a cached Debian 13 root's) may name a kernel
        # the mirror no longer has: read them again, once.
        _run("apt-get", "update", "-qq")
        return _build_image(cache)


def _build_image(cache: Path) -> GuestImage:
    kernel_pkg, kernel_version = _kernel_package()
    busybox_version = _candidate(BUSYBOX)["Version"]
    digest = hashlib.sha256("\0".join((INIT, *NET_MODULES, *VLAN_MODULES, _CPIO_FORMAT)).encode()).hexdigest()[:12]
    label = f"{kernel_pkg}_{kernel_version} {BUSYBOX}_{busybox_version}"
    folder = cache / re.sub(r"[^A-Za-z0-9.+_-]", "_", f"guest-{kernel_pkg}_{kernel_version}-busybox_{busybox_version}-{digest}")
    image = GuestImage(folder / "vmlinuz", folder / "initrd.cpio", label)
    if image.initrd.exists():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "guest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same image
        if image.initrd.exists():
            return image
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        try:
            _run("apt-get", "download", "-o", "APT::Sandbox::User=root",
                 f"{kernel_pkg}={kernel_version}", f"{BUSYBOX}={busybox_version}", cwd=debs)
        except RuntimeError as err:
            raise _NotDownloaded(str(err)) from err
        work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-guest-", dir="/tmp"))
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
        try:
            for deb in (_deb(debs, kernel_pkg, kernel_version), _deb(debs, BUSYBOX, busybox_version)):
                _run("dpkg-deb", "-x", str(deb), str(work))
            vmlinuz = list((work / "boot").glob("vmlinuz-*"))
            if len(vmlinuz) != 1:
                raise RuntimeError(f"{kernel_pkg} has {len(vmlinuz)} kernels in /boot, expected one")
            shutil.copyfile(vmlinuz[0], partial / "vmlinuz")
            (partial / "initrd.cpio").write_bytes(_initramfs(work))
            (partial / "versions").write_text(label + "\n")
            partial.chmod(0o755)
            partial.rename(folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
        for deb in debs.glob("*.deb"):  # the image is the cache; the packages are not needed again
            deb.unlink()
    return image


def _run(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return result.stdout


def _candidate(package: str) -> dict[str, str]:
    """The fields of the version apt would install now; runs apt-get update once if needed."""
    for attempt in range(2):
        result = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                                capture_output=True, text=True, timeout=TIMEOUT)
        if result.returncode == 0 and result.stdout.strip():
            return dict(re.findall(r"^([A-Za-z-]+): (.*)$", result.stdout, re.M))
        if attempt == 0:
            _run("apt-get", "update", "-qq")
    raise RuntimeError(f"apt knows no package {package}: {result.stderr.strip()}")


def _kernel_package() -> tuple[str, str]:
    """linux-image-amd64 is a metapackage: the kernel is the package it depends on."""
    depends = _candidate(KERNEL_META).get("Depends", "")
    match = re.match(r"\s*(linux-image-[^\s,(]+)\s*\(=\s*([^)\s]+)\)", depends)
    if not match:
        raise RuntimeError(f"cannot find the kernel package in {KERNEL_META}'s Depends: {depends!r}")
    return match.group(1), match.group(2)


def _deb(folder: Path, package: str, version: str) -> Path:
    # apt-get download names files <package>_<version with ':' as %3a>_<arch>.deb
    found = list(folder.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    if len(found) != 1:
        raise RuntimeError(f"apt-get download left {len(found)} files for {package} {version} in {folder}")
    return found[0]


def kernel_modules(tree: Path) -> Path:
    """The one <version>/ modules folder of a kernel package unpacked in `tree`.

    Debian 13's packages put everything under usr/ (usr/lib/modules), Debian 12's at / (lib/modules).
    """
    found = [m for folder in ("usr/lib/modules", "lib/modules") if (tree / folder).is_dir() and
             not (tree / folder).is_symlink() for m in (tree / folder).iterdir()]
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel's modules in usr/lib/modules or lib/modules of {tree}, found {found}")
    return found[0]


def _initramfs(root: Path) -> bytes:
    modules = kernel_modules(root)
    busybox = [path for path in (root / "usr/bin/busybox", root / "bin/busybox") if path.is_file()]
    if len(busybox) != 1:
        raise RuntimeError(f"expected one busybox in usr/bin or bin, found {busybox}")
    net = module_load_order(modules, NET_MODULES)
    vlan = [m for m in module_load_order(modules, VLAN_MODULES) if m not in net]
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""), ("dev", 0o40755, b""), ("modules", 0o40755, b""),
        ("dev/console", 0o20600, b""),
        ("bin/busybox", 0o100755, busybox[0].read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, INIT.encode()),
        ("modules/net.order", 0o100644, "".join(f"{name}\n" for name, _ in net).encode()),
        ("modules/vlan.order", 0o100644, "".join(f"{name}\n" for name, _ in vlan).encode()),
    ]
    entries += [(f"modules/{name}.ko", 0o100644, data) for name, data in [*net, *vlan]]
    return cpio_newc(entries)


# --- kernel modules ------------------------------------------------------------------

_KO = re.compile(r"^(.*)\.ko(\.xz|\.gz)?$")


def module_load_order(module_root: Path, targets: Iterable[str]) -> list[tuple[str, bytes]]:
    """(name, uncompressed .ko) of `targets` and what they depend on, dependencies first.

    Built-in modules (modules.builtin) are skipped: there is nothing to load.
    """
    files: dict[str, Path] = {}
    for path in (module_root / "kernel").rglob("*.ko*"):
        if match := _KO.match(path.name):
            files[match.group(1).replace("-", "_")] = path
    builtin_file = module_root / "modules.builtin"
    builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
               for line in (builtin_file.read_text().split() if builtin_file.exists() else [])}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise RuntimeError(f"kernel module {name} is neither in {module_root} nor built in")
        data = _uncompressed(files[name])
        for dep in modinfo(data).get("depends", "").split(","):
            if dep:
                visit(dep)
        order.append((name, data))

    for target in targets:
        visit(target)
    return order


def _uncompressed(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)  # busybox insmod takes plain .ko files only
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def modinfo(ko: bytes) -> dict[str, str]:
    """The key=value strings of an ELF64 module's .modinfo section."""
    if ko[:5] != b"\x7fELF\x02":
        raise RuntimeError("not an ELF64 kernel module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(index: int) -> tuple[int, int, int]:  # name offset, file offset, size
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + index * shentsize)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for index in range(shnum):
        name_at, offset, size = section(index)
        if ko[names_at + name_at:].split(b"\0", 1)[0] == b".modinfo":
            pairs = (item.split(b"=", 1) for item in ko[offset:offset + size].split(b"\0") if b"=" in item)
            return {key.decode(): value.decode(errors="replace") for key, value in pairs}
    return {}


# --- cpio ---------------------------------------------------------------------------

_CPIO_FORMAT = "newc-1"  # part of the cache key: bump when cpio_newc changes its output


def cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's initramfs format (newc) of (path, mode, data) entries.

    Symlinks carry their target as data; /dev/console (mode 0o20600) is character device 5:1.
    """
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        rdev = (5, 1) if name == "dev/console" else (0, 0)
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
        pad()
        out += data
        pad()
    return bytes(out)
