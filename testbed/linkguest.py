"""A second mode of the test guest (guest.py) for VM-to-VM links: a bridge with STP and
raw LLDP frames. Pytest-free: the link tests (tests/fixtures/linkguest.py wraps it as a
fixture) and the demo (scripts/demo-cycle) boot it.

The data-path image (Debian's kernel, busybox, the virtio-net modules) is
reused as it is; this mode appends a second cpio archive to its initramfs (the kernel
unpacks concatenated archives in order), holding:

- `/linkinit`, started instead of `/init` with `rdinit=/linkinit`, so the data-path
  image and its tests stay exactly as they are;
- `bridge.ko` and what it depends on (llc, stp), from the same kernel package;
- `/bin/linkprobe`, a small static program (linkprobe.c, compiled here with gcc) that
  sends LLDP frames to 01:80:c2:00:00:0e and reports, per source MAC, what it heard:
  busybox can neither send nor show a raw frame.

The guest runs the steps named on its kernel command line, each printing one line that
starts with MARK (`link.steps=ping,lldp,stp,hold`):

| step | what it prints |
| --- | --- |
| `ping` | `reply ...` after the first answer from `link.peer`, else `no-reply` (then it powers off) |
| `lldp` | `linkprobe: lldp sent=N self=K from=MAC*M,...`: frames sent for `link.lldp` s, own frames heard back (K), and each sender heard |
| `listen` | `linkprobe: listening`, then one `linkprobe: heard IFACE from=MAC` per LLDP frame, for `link.listen` s |
| `stp` | `stp bridge=ID root=ID port=STATE`: eth0 in bridge br0 with STP on (priority `link.prio`, hello 1 s, forward delay 2 s), after `link.stp` s; the address moves to br0 |
| `hold` | `holding`, then answers pings for `link.hold` s |

then `done`, and it powers off. Cached next to the data-path image, keyed by its name and
a digest of what this file adds.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from testbed import guest as base

HERE = Path(__file__).resolve().parent
PROBE_SOURCE = HERE / "linkprobe.c"
BRIDGE_MODULES = ("bridge",)
MARK = "pve-vhost-agent-link:"

LINK_INIT = (base.PRELUDE + r"""off() { say "done uptime $(cat /proc/uptime)"; sync; poweroff -f; }

steps=ping addr= peer= prio=32768 timeout=60 lldp=5 listen=30 stp=8 hold=120
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    link.steps=*) steps=${arg#*=} ;;
    link.addr=*) addr=${arg#*=} ;;
    link.peer=*) peer=${arg#*=} ;;
    link.prio=*) prio=${arg#*=} ;;
    link.timeout=*) timeout=${arg#*=} ;;
    link.lldp=*) lldp=${arg#*=} ;;
    link.listen=*) listen=${arg#*=} ;;
    link.stp=*) stp=${arg#*=} ;;
    link.hold=*) hold=${arg#*=} ;;
  esac
done

load net
ip link set lo up
for dev in /sys/class/net/eth*; do ip link set "${dev##*/}" up; done
[ -n "$addr" ] && ip addr add "$addr" dev eth0
say "ready $(ls /sys/class/net | tr '\n' ' ')uptime $(cat /proc/uptime)"

for step in $(echo "$steps" | tr , ' '); do
  case "$step" in
    ping)
      end=$(( $(now) + timeout )) tries=0
      until ping -c 1 -W 1 "$peer" >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ "$(now)" -ge "$end" ] && { say "no-reply from $peer after $tries pings"; off; }
        sleep 0.2
      done
      say "reply from $peer after $tries unanswered pings, uptime $(cat /proc/uptime)" ;;
    lldp)
      say "$(linkprobe lldp eth0 "$lldp")" ;;
    listen)
      linkprobe listen "$listen" $(ls /sys/class/net | grep eth) ;;
    stp)
      load bridge
      brctl addbr br0
      b=/sys/class/net/br0
      # busybox's brctl has no STP commands: the kernel's sysfs, times in 1/100 s.
      echo "$prio" >$b/bridge/priority
      echo 100 >$b/bridge/hello_time
      echo 200 >$b/bridge/forward_delay
      echo 1 >$b/bridge/stp_state
      ip addr flush dev eth0
      brctl addif br0 eth0
      ip link set br0 up
      [ -n "$addr" ] && ip addr add "$addr" dev br0
      sleep "$stp"
      say "stp bridge=$(cat $b/bridge/bridge_id) root=$(cat $b/bridge/root_id) port=$(cat $b/brif/eth0/state)" ;;
    hold)
      say "holding"
      sleep "$hold" ;;
  esac
done
off
""").replace("@MARK@", MARK)

PORT_STATES = {"0": "disabled", "1": "listening", "2": "learning", "3": "forwarding", "4": "blocking"}


def kernel_command_line(steps: str, *, addr: str = "", peer: str = "", prio: int = 32768, **seconds: int) -> str:
    """`-append` for the link guest: `steps` (comma-separated) and their settings in seconds
    (timeout, lldp, listen, stp, hold)."""
    parts = ["rdinit=/linkinit", "console=ttyS0", "quiet", "panic=-1", "ipv6.disable=1",
             # A TCG vCPU starved by a busy host fails the kernel's IO-APIC timer check: skip it.
             "no_timer_check", f"link.steps={steps}", f"link.prio={prio}"]
    parts += [f"link.addr={addr}"] if addr else []
    parts += [f"link.peer={peer}"] if peer else []
    parts += [f"link.{name}={value}" for name, value in sorted(seconds.items())]
    return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class LinkImage:
    kernel: Path
    initrd: Path
    label: str


def build_link_image(cache: Path) -> LinkImage:
    data_path = base.build_image(cache)
    digest = hashlib.sha256("\0".join((LINK_INIT, PROBE_SOURCE.read_text(), *BRIDGE_MODULES,
                                       base._CPIO_FORMAT)).encode()).hexdigest()[:12]
    folder = cache / f"{data_path.initrd.parent.name}-link-{digest}"
    image = LinkImage(data_path.kernel, folder / "initrd.cpio", f"{data_path.label} + link mode")
    if image.initrd.exists():
        return image
    with open(cache / "guest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        if image.initrd.exists():
            return image
        work = Path(tempfile.mkdtemp(prefix=f"{base.PREFIX}-link-", dir="/tmp"))
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
        try:
            overlay = _overlay(work)
            (partial / "initrd.cpio").write_bytes(data_path.initrd.read_bytes() + overlay)
            partial.chmod(0o755)
            partial.rename(folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
    return image


def _overlay(work: Path) -> bytes:
    """The second archive: /linkinit, the bridge modules, /bin/linkprobe."""
    kernel_pkg, kernel_version = base._kernel_package()
    debs = work / "debs"
    debs.mkdir()
    base._run("apt-get", "download", "-o", "APT::Sandbox::User=root", f"{kernel_pkg}={kernel_version}", cwd=debs)
    tree = work / "tree"
    base._run("dpkg-deb", "-x", str(base._deb(debs, kernel_pkg, kernel_version)), str(tree))
    modules = base.module_load_order(base.kernel_modules(tree), BRIDGE_MODULES)
    probe = work / "linkprobe"
    base._run("gcc", "-static", "-Os", "-Wall", "-Werror", "-s", "-o", str(probe), str(PROBE_SOURCE))
    entries = [("linkinit", 0o100755, LINK_INIT.encode()),
               ("bin/linkprobe", 0o100755, probe.read_bytes()),
               ("modules/bridge.order", 0o100644, "".join(f"{name}\n" for name, _ in modules).encode())]
    entries += [(f"modules/{name}.ko", 0o100644, data) for name, data in modules]
    return base.cpio_newc(entries)


# --- reading its console ---------------------------------------------------------------


@dataclasses.dataclass
class Console:
    """A link guest's serial console file (each QEMU run writes its own)."""

    path: Path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def lines(self, prefix: str = MARK) -> list[str]:
        return [line[len(prefix):].strip() for line in self.text().splitlines() if line.startswith(prefix)]

    def line(self, word: str) -> str | None:
        """The first marked line whose text starts with `word`."""
        return next((line for line in self.lines() if line.startswith(word)), None)

    def wait(self, word: str, timeout: float, alive=lambda: True) -> str:
        deadline = time.monotonic() + timeout
        while (line := self.line(word)) is None:
            if self.line("done") is not None or not alive() or time.monotonic() > deadline:
                raise AssertionError(f"no `{word}` on the guest console within {timeout} s:\n{self.text()}")
            time.sleep(0.1)
        return line

    def heard(self) -> list[tuple[str, str]]:
        """(interface, source MAC) of each LLDP frame the `listen` step heard so far."""
        found = []
        for line in self.text().splitlines():
            if line.startswith("linkprobe: heard "):
                iface, _, source = line.removeprefix("linkprobe: heard ").partition(" from=")
                found.append((iface, source.strip()))
        return found


def parse_fields(line: str) -> dict[str, str]:
    """`lldp sent=5 self=0 from=a*1` -> {'sent': '5', 'self': '0', 'from': 'a*1'}."""
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def lldp_senders(line: str) -> dict[str, int]:
    """The `from=` field of an lldp line: {source MAC: frames heard}."""
    text = parse_fields(line).get("from", "")
    return {mac: int(count) for mac, _, count in (item.partition("*") for item in text.split(",") if item)}
