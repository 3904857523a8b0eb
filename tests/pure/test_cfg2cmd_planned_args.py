"""Planned args against Proxmox's own command lines (qemu-server's cfg2cmd test corpus).

For every config with a `.conf.cmd`, vhost-user NICs are added at free netN; since
`args:` is appended after everything in the `.cmd`, the planned args must collide with
nothing there: PCI bus+slot, ids, `-numa` vs `-machine memory-backend`, a second memory
backend. Or the planner must refuse, for the reason the `.cmd` itself shows (hot-plugged
DIMMs, NUMA nodes on unshared RAM, a balloon device).
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import PEER
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.errors import MemoryLayoutError
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import Backend, VhostNic, VmSpec, random_mac, unused_mac

CORPUS = PEER / "qemu-server-cfg2cmd"
READCONFIG = PEER / "qemu-server-readconfig"
CASES = sorted(p.name[: -len(".cmd")] for p in CORPUS.glob("*.conf.cmd"))
VMID = 8006  # the corpus's VM id
DIRS = {b: Settings(node="n1").socket_dir(b.value) for b in Backend}


def read_conf(path: Path) -> tuple[dict[str, str], tuple[int, int, int]]:
    """The main section's keys (what the VM starts with), and the test's QEMU version."""
    config, version = {}, (10, 1, 0)
    for line in path.read_text().splitlines():
        if line.startswith("["):
            break
        match = re.match(r"# QEMU_VERSION: (\d+)\.(\d+)(?:\.(\d+))?", line)
        if match:
            version = (int(match[1]), int(match[2]), int(match[3] or 0))
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        config[key.strip()] = value.strip()
    return config, version


def read_cmd(path: Path) -> list[tuple[str, str | None]]:
    """(option, value) per continuation line: one shell-quoted argument (pair) per line."""
    pairs = []
    for line in path.read_text().splitlines()[1:]:
        words = shlex.split(line.rstrip().removesuffix("\\"))
        pairs.append((words[0], words[1] if len(words) > 1 else None))
    return pairs


def props(value: str, implied: str) -> dict[str, str]:
    if value.startswith("{"):
        return {k: str(v) for k, v in json.loads(value).items()}
    out = {}
    for i, item in enumerate(value.split(",")):
        key, sep, val = item.partition("=")
        out.update({key: val} if sep else {implied if i == 0 else key: item if i == 0 else "on"})
    return out


IMPLIED = {"-device": "driver", "-netdev": "type", "-chardev": "backend", "-object": "qom-type",
           "-machine": "type", "-numa": "type", "-m": "size"}


def options(pairs, name):
    return [props(value, IMPLIED[name]) for option, value in pairs if option == name]


def readconfig_devices(pairs) -> list[dict[str, str]]:
    """The devices of Proxmox's -readconfig file (q35 topology), as -device props."""
    devices = []
    for option, value in pairs:
        if option == "-readconfig":
            text = (READCONFIG / Path(value).name).read_text()
            for ident, body in re.findall(r'^\[device "([^"]+)"\]\n((?:  .*\n?)*)', text, re.M):
                devices.append({"id": ident, **dict(re.findall(r'^\s+(\S+) = "([^"]*)"', body, re.M))})
    return devices


def slot(device: dict[str, str]) -> tuple[str, int] | None:
    if "addr" not in device:
        return None
    return device.get("bus"), int(device["addr"].split(".")[0], 16)


def expected_refusal(pairs, balloon_off: bool) -> str | None:
    """What the .cmd shows that makes vhost-user unsafe, in the planner's order."""
    memory = " ".join(v for o, v in pairs if o == "-m")
    backends = [o for o in options(pairs, "-object") if o["qom-type"].startswith("memory-backend")]
    if "slots=" in memory or any(d["driver"] == "pc-dimm" for d in options(pairs, "-device")):
        return "memory hotplug"
    if options(pairs, "-numa") and not all(b.get("share") == "on" for b in backends):
        return "numa on without hugepages"
    if not balloon_off and any(d["driver"] == "virtio-balloon-pci" for d in options(pairs, "-device")):
        return "ballooning on"
    return None


def vhost_nics(config, which: str) -> tuple[VhostNic, ...]:
    used = {int(k[3:]) for k in config if re.fullmatch(r"net\d+", k)}
    free = [i for i in range(32) if i not in used]
    if which == "two":  # one on pci.0 (net0-5), one on pci.1 (net6-31)
        free = [next(i for i in free if i < 6), next(i for i in free if i >= 6)]
    nics, macs = [], [v.split("=")[1].split(",")[0] for k, v in config.items() if k in {f"net{i}" for i in used}]
    for n, index in enumerate(free):
        mac = unused_mac((random_mac(bytes([0x02, 0, 0, 0, index, salt])) for salt in range(256)), macs)
        macs.append(mac)
        backend = Backend.OVS if n % 2 == 0 else Backend.EXTERNAL
        nics.append(VhostNic(VMID, index, "vhubr0", mac, backend=backend, queues=1 + n % 3, mtu=9000 if n % 2 else None))
    return tuple(nics)


@pytest.mark.parametrize("balloon_off", [False, True], ids=["balloon-default", "balloon-0"])
@pytest.mark.parametrize("case", CASES)
def test_planned_args_collide_with_nothing_proxmox_generates(case, balloon_off):
    config, version = read_conf(CORPUS / case)
    if balloon_off:
        config["balloon"] = "0"
    pairs = read_cmd(CORPUS / f"{case}.cmd")
    refusal = expected_refusal(pairs, balloon_off)
    for which in ("two", "all"):
        spec = VmSpec(VMID, vhost_nics(config, which))
        if config.get("template") == "1":
            # Proxmox starts templates from a minimal config without args (see the .cmd).
            assert plan_args(spec, config, version, DIRS).args == ()
            continue
        if refusal:
            with pytest.raises(MemoryLayoutError, match=refusal):
                plan_args(spec, config, version, DIRS)
            continue
        planned = plan_args(spec, config, version, DIRS).args
        check_no_collision(pairs, list(zip(planned[::2], planned[1::2])), len(spec.nics))


def check_no_collision(pairs, planned, nic_count):
    theirs = options(pairs, "-device") + readconfig_devices(pairs)
    ours = options(planned, "-device")
    assert len(ours) == nic_count
    # PCI: our slots are free, on buses that exist (i440fx's root bus is pci.0).
    taken = {slot(d) for d in theirs}
    buses = {d.get("id") for d in theirs if d["driver"] == "pci-bridge"}
    if not any(o == "-readconfig" for o, _ in pairs):
        buses.add("pci.0")
    for device in ours:
        assert slot(device) not in taken, device
        assert device["bus"] in buses, device
    # ids: none of ours is used by Proxmox for the same kind of option.
    for name in ("-device", "-netdev", "-chardev", "-object"):
        their_ids = {p.get("id") for p in options(pairs, name)} | ({d.get("id") for d in theirs} if name == "-device" else set())
        for ident in (p["id"] for p in options(planned, name)):
            assert ident not in their_ids
    # Memory: one shared backend for all guest memory, never beside -numa or a second one.
    their_backends = [o for o in options(pairs, "-object") if o["qom-type"].startswith("memory-backend")]
    machine_backend = any("memory-backend" in m for m in options(pairs, "-machine"))
    our_backends = options(planned, "-object")
    if our_backends:
        assert not options(pairs, "-numa") and not machine_backend and not their_backends
        (size,) = [v for o, v in pairs if o == "-m"]
        assert our_backends == [{"qom-type": "memory-backend-memfd", "id": "vhu-mem", "size": f"{size}M", "share": "on"}]
        assert options(planned, "-machine") == [{"memory-backend": "vhu-mem"}]
    else:
        assert not options(planned, "-machine")
        assert their_backends and all(b.get("share") == "on" for b in their_backends)
    # Sockets: ours are not Proxmox's.
    their_paths = {p.get("path") for p in options(pairs, "-chardev")}
    assert not their_paths & {p["path"] for p in options(planned, "-chardev")}


@pytest.mark.peer
def test_the_corpus_has_configs_to_plan_and_to_refuse():
    """Guards the table above against passing vacuously."""
    outcomes = {}
    for case in CASES:
        for balloon_off in (False, True):
            reason = expected_refusal(read_cmd(CORPUS / f"{case}.cmd"), balloon_off) or "planned"
            outcomes[reason] = outcomes.get(reason, 0) + 1
    assert len(CASES) >= 90
    assert outcomes["planned"] >= 60
    assert {"memory hotplug", "numa on without hugepages", "ballooning on"} <= set(outcomes)
