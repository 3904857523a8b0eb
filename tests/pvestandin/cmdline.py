"""A VM config turned into a QEMU command line, the way qemu-server 9.2 `config_to_command` does
for the parts that matter to the agent: machine version, `-m`, NUMA memory backends, the i440fx
PCI bridges (q35: `-readconfig`), the balloon device, Proxmox's own NICs, and `args:` appended
after everything else. Pure: the host facts it depends on come in as a `HostFacts` value.

Not modelled (they do not touch memory, PCI slots used by NICs, or args): disks, CD-ROMs,
USB, VGA, -cpu, SMBIOS, vmgenid, OVMF, serial, audio, hostpci, watchdog, spice/vnc, the
virtiofs device itself (its memory backend is), memory hotplug (refused), Windows machine
pinning, custom NUMA `hostnodes` checks, NIC `rate`/`link_down`/firewall bridges.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Callable, Mapping

MAX_NETS = 32
MAX_NUMA = 8
DEFAULT_MEMORY = 512
NET_MODELS = ("virtio", "e1000", "e1000-82540em", "e1000-82544gc", "e1000-82545em", "e1000e",
              "i82551", "i82557b", "i82559er", "ne2k_isa", "ne2k_pci", "pcnet", "rtl8139", "vmxnet3")
# qemu-server Machine.pm $PVE_MACHINE_VERSION: the highest +pveN per QEMU major.minor.
PVE_MACHINE_REVISIONS = {(4, 1): 2, (9, 2): 1, (10, 0): 1, (11, 0): 2}
# `.pxe` machines use the old iPXE option ROMs (`qemu_use_old_bios_files`).
PXE_ROMS = {"virtio-net-pci": "pxe-virtio.rom", "e1000": "pxe-e1000.rom", "e1000e": "pxe-e1000e.rom",
            "ne2k": "pxe-ne2k_pci.rom", "pcnet": "pxe-pcnet.rom", "rtl8139": "pxe-rtl8139.rom"}
_MACHINE_VERSION = re.compile(r"^(?:pc|pc-i440fx|pc-q35|virt)-(\d+)\.(\d+)(?:\+pve(\d+))?(?:\.pxe)?$")


class NotModelled(Exception):
    """The config uses something the stand-in does not build (say so rather than guess)."""


class ConfigError(Exception):
    """Proxmox itself would refuse this config at start (message as Proxmox words it)."""


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """What `config_to_command` reads from the host."""

    qemu_version: str  # `kvm_user_version`: "7.2.22"
    vhost_net: bool  # `kernel_has_vhost_net`: /dev/vhost-net is a character device
    bridge_mtu: Callable[[str], int]  # PVE::Network::read_bridge_mtu (dies for a missing bridge)
    root: Path = Path("/")  # host paths (/var/run, /usr/libexec, /run/hugepages) live here
    hugepage_sizes_mib: tuple[int, ...] = (2, 1024)  # /sys/kernel/mm/hugepages/hugepages-*kB

    def path(self, host_path: str) -> str:
        return str(self.root / host_path.lstrip("/"))


Version = tuple[int, int, int]  # major, minor, pve revision


def parse_property_string(value: str, default_key: str | None = None) -> dict[str, str]:
    props: dict[str, str] = {}
    for i, item in enumerate(value.split(",")):
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep:
            if i == 0 and default_key:
                key, val = default_key, item
            else:
                val = "1"
        props[key] = val
    return props


def min_version(version: Version, major: int, minor: int, pve: int = 0) -> bool:
    return version >= (major, minor, pve)


def machine_type(conf: Mapping[str, str]) -> str:
    return parse_property_string(conf.get("machine", ""), "type").get("type", "")


def is_q35(conf: Mapping[str, str]) -> bool:
    return "q35" in machine_type(conf)


def machine_version(conf: Mapping[str, str], facts: HostFacts) -> Version:
    """`extract_version(get_vm_machine(...))`: a pinned version, else the installed QEMU's."""
    machine = machine_type(conf)
    qemu = tuple(int(x) for x in facts.qemu_version.split(".")[:2])
    if machine in ("", "pc", "q35"):
        if conf.get("ostype", "").startswith("win"):
            raise NotModelled("Windows VMs without a pinned machine version")
        version = (*qemu, PVE_MACHINE_REVISIONS.get(qemu, 0))
    else:
        match = _MACHINE_VERSION.match(machine)
        if not match:
            raise NotModelled(f"machine type {machine!r}")
        version = (int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))
    if version[:2] > qemu:
        raise ConfigError(
            f"Installed QEMU version '{facts.qemu_version}' is too old to run machine type '{machine}'"
        )
    if version[2] > PVE_MACHINE_REVISIONS.get(version[:2], 0):
        raise ConfigError(f"Installed qemu-server is too old to run machine type '{machine}'")
    return version


def qemu_machine_name(conf: Mapping[str, str]) -> str:
    """The QEMU machine to run: Proxmox's type without its `+pveN` suffix."""
    machine = machine_type(conf) or "pc"
    return re.sub(r"\+pve\d+", "", machine).removesuffix(".pxe")


# --- memory (qemu-server QemuServer/Memory.pm `config`) ------------------------------


def current_memory(conf: Mapping[str, str]) -> int:
    raw = conf.get("memory")
    if raw is None:
        return DEFAULT_MEMORY
    return int(parse_property_string(raw, "current")["current"])


def _hugepage_size(conf: Mapping[str, str], size: int, facts: HostFacts) -> int:
    if size <= 0 or size & 1:
        raise ConfigError(f"memory size '{size}' is not a positive even integer; cannot use for hugepages")
    wanted = conf["hugepages"]
    if wanted == "any":
        if 1024 in facts.hugepage_sizes_mib and size % 1024 == 0:
            return 1024
        if 2 in facts.hugepage_sizes_mib:
            return 2
        raise ConfigError(f"host only supports 1024 GB hugepages, but requested size '{size}' is not a multiple of 1024 MB")
    page = int(wanted)
    if page not in facts.hugepage_sizes_mib:
        raise ConfigError(f"your system doesn't support hugepages of {page} MB")
    if size % page:
        raise ConfigError(f"Memory size {size} is not a multiple of the requested hugepages size {page}")
    return page


def hugepages_mount_path(page_mib: int) -> str:
    return f"/run/hugepages/kvm/{page_mib * 1024}kB"


def memory_object(conf: Mapping[str, str], memdev: str, size: int, facts: HostFacts) -> str:
    if conf.get("hugepages"):
        path = facts.path(hugepages_mount_path(_hugepage_size(conf, size, facts)))
        return f"memory-backend-file,id={memdev},size={size}M,mem-path={path},share=on,prealloc=yes"
    if memdev.startswith("virtiofs-mem"):
        return f"memory-backend-memfd,id={memdev},size={size}M,share=on"
    return f"memory-backend-ram,id={memdev},size={size}M"


def _flag(conf: Mapping[str, str], key: str) -> bool:
    return conf.get(key, "0") not in ("0", "")


def _cpu_sets(text: str) -> list[str]:
    return [part for part in text.split(";") if part]


def memory_args(conf: Mapping[str, str], sockets: int, cores: int, facts: HostFacts) -> tuple[list[str], list[str]]:
    """(-m and NUMA arguments, extra -machine flags)."""
    hotplug = conf.get("hotplug", "network,disk,usb")
    if "memory" in hotplug.split(","):
        raise NotModelled("memory hotplug")
    memory = current_memory(conf)
    virtiofs = any(re.match(r"^virtiofs\d+$", k) for k in conf)
    numa = _flag(conf, "numa")
    if conf.get("hugepages") and not numa:
        raise ConfigError("numa needs to be enabled to use hugepages")
    args = ["-m", str(memory)]
    machine_flags: list[str] = []
    if numa:
        custom_total = 0
        for i in range(MAX_NUMA):
            if not conf.get(f"numa{i}"):
                continue
            node = parse_property_string(conf[f"numa{i}"], "cpus")
            if "memory" not in node:
                raise ConfigError(f"missing NUMA node{i} memory value")
            size = int(node["memory"])
            custom_total += size
            memdev = f"virtiofs-mem{i}" if virtiofs else f"ram-node{i}"
            obj = memory_object(conf, memdev, size, facts)
            if "hostnodes" in node:
                obj += f",host-nodes={node['hostnodes'].replace(';', ',')},policy={node.get('policy', '')}"
            cpus = ",cpus=".join(_cpu_sets(node["cpus"]))
            args += ["-object", obj, "-numa", f"node,nodeid={i},cpus={cpus},memdev={memdev}"]
        if custom_total and custom_total != memory:
            raise ConfigError("total memory for NUMA nodes must be equal to vm static memory")
        if not custom_total:
            per_node = memory // sockets
            for i in range(sockets):
                first = cores * i
                cpus = f"{first}-{first + cores - 1}" if cores > 1 else str(first)
                memdev = f"virtiofs-mem{i}" if virtiofs else f"ram-node{i}"
                args += ["-object", memory_object(conf, memdev, per_node, facts),
                         "-numa", f"node,nodeid={i},cpus={cpus},memdev={memdev}"]
    elif virtiofs:
        args += ["-object", f"memory-backend-memfd,id=virtiofs-mem,size={conf.get('memory', DEFAULT_MEMORY)}M,share=on"]
        machine_flags.append("memory-backend=virtiofs-mem")
    return args, machine_flags


# --- PCI slots (qemu-server QemuServer/PCI.pm) ----------------------------------------


def pci_addr(device_id: str) -> tuple[int, int] | None:
    """(bus, slot) of the devices the stand-in places."""
    fixed = {"balloon0": (0, 3), "pci.1": (0, 30), "pci.2": (0, 31)}
    if device_id in fixed:
        return fixed[device_id]
    match = re.match(r"^net(\d+)$", device_id)
    if match:
        n = int(match.group(1))
        return (0, 18 + n) if n < 6 else (1, n - 5)
    return None


def print_pci_addr(device_id: str, bridges: set[int]) -> str:
    addr = pci_addr(device_id)
    if addr is None:
        return ""
    bridges.add(addr[0])
    return f",bus=pci.{addr[0]},addr={addr[1]:#x}"


# --- NICs (qemu-server QemuServer.pm print_netdev_full / print_netdevice_full) -------------


def parse_net(value: str) -> dict[str, str]:
    props = parse_property_string(value)
    net = dict(props)
    for model in NET_MODELS:
        if model in props:
            net["model"], net["macaddr"] = model, props[model]
            del net[model]
            break
    if "model" not in net:
        raise ConfigError(f"unable to parse network options '{value}'")
    if not net.get("macaddr"):
        raise NotModelled("NICs without a MAC address (Proxmox generates one)")
    return net


def boot_order(conf: Mapping[str, str]) -> dict[str, int]:
    """bootindex per NIC (`device_bootorder`; disks are not modelled)."""
    boot = conf.get("boot")
    props = parse_property_string(boot, "legacy") if boot is not None else {}
    nets = [f"net{i}" for i in range(MAX_NETS) if conf.get(f"net{i}")]
    if "order" in props:
        order = [d for d in re.split(r"[;,\s]+", props["order"]) if d]
        return {dev: 100 + i for i, dev in enumerate(order) if dev in nets}
    legacy = props.get("legacy", "cdn")
    if "n" not in legacy:
        return {}
    base = (legacy.index("n") + 1) * 100
    return {net: base + i for i, net in enumerate(nets)}


def netdev_arg(vmid: int, conf: Mapping[str, str], net: Mapping[str, str], netid: str, facts: HostFacts) -> str:
    index = int(netid[3:])
    ifname = f"tap{vmid}i{index}"
    if len(ifname) >= 16:
        raise ConfigError(f"interface name '{ifname}' is too long (max 15 character)")
    if net.get("bridge"):
        vhost = ",vhost=on" if facts.vhost_net and net["model"] == "virtio" else ""
        netdev = (f"type=tap,id={netid},ifname={ifname},script={facts.path('/usr/libexec/qemu-server/pve-bridge')}"
                  f",downscript={facts.path('/usr/libexec/qemu-server/pve-bridgedown')}{vhost}")
    else:
        netdev = f"type=user,id={netid},hostname={conf.get('name') or f'vm{vmid}'}"
    if net.get("queues") and net["model"] == "virtio":
        netdev += f",queues={net['queues']}"
    return netdev


def netdevice_arg(net: Mapping[str, str], netid: str, bridges: set[int], version: Version,
                  bootindex: int | None, facts: HostFacts, pxe: bool = False) -> str:
    virtio = net["model"] == "virtio"
    device = "virtio-net-pci" if virtio else net["model"]
    text = f"{device},mac={net['macaddr']},netdev={netid}{print_pci_addr(netid, bridges)},id={netid}"
    queues = int(net.get("queues") or 0)
    if queues > 1 and virtio:
        text += f",vectors={queues * 2 + 2},mq=on"
        if min_version(version, 7, 1):
            text += ",packed=on"
    if virtio and min_version(version, 7, 1):
        text += ",rx_queue_size=1024,tx_queue_size=256"
    if bootindex:
        text += f",bootindex={bootindex}"
    if virtio and net.get("bridge"):
        bridge_mtu = facts.bridge_mtu(net["bridge"])
        mtu = int(net["mtu"]) if net.get("mtu") else None
        if mtu is None or mtu == 1:
            mtu = bridge_mtu
        elif mtu < 576:
            raise ConfigError(f"netdev {netid}: MTU '{mtu}' is smaller than the IP minimum MTU '576'")
        elif mtu > bridge_mtu:
            raise ConfigError(f"netdev {netid}: MTU '{mtu}' is bigger than the bridge MTU '{bridge_mtu}'")
        if min_version(version, 10, 0, 1) or mtu != 1500:
            text += f",host_mtu={mtu}"
    if pxe and device in PXE_ROMS:
        text += f",romfile={PXE_ROMS[device]}"
    if virtio:
        host_tunnel = net.get("host-tunnel")
        if min_version(version, 11, 0, 1):
            if host_tunnel in (None, "0"):
                text += ",host_tunnel=off"
        elif min_version(version, 10, 2) and host_tunnel == "0":
            text += ",host_tunnel=off"
    return text


def net_args(vmid: int, conf: Mapping[str, str], version: Version, bridges: set[int], facts: HostFacts) -> list[str]:
    order = boot_order(conf)
    args = []
    for i in range(MAX_NETS):
        netid = f"net{i}"
        if not conf.get(netid):
            continue
        net = parse_net(conf[netid])
        args += ["-netdev", netdev_arg(vmid, conf, net, netid, facts)]
        pxe = machine_type(conf).endswith(".pxe")
        args += ["-device", netdevice_arg(net, netid, bridges, version, order.get(netid), facts, pxe)]
    return args


# --- the whole command line ------------------------------------------------------------


def split_args(text: str) -> list[str]:
    """Proxmox's `split_args` (Text::ParseWords::shellwords): shell quoting, no expansion."""
    return shlex.split(text, comments=False, posix=True) if text else []


@dataclasses.dataclass(frozen=True)
class Command:
    """The command line in parts, so a test can look at what Proxmox generated."""

    generated: tuple[str, ...]  # everything Proxmox builds from the config
    args: tuple[str, ...]  # the `args:` line, split; appended after `generated`

    @property
    def argv(self) -> list[str]:
        return [*self.generated, *self.args]


def config_to_command(vmid: int, conf: Mapping[str, str], facts: HostFacts, binary: str = "qemu-system-x86_64",
                      machine_extra: tuple[str, ...] = ()) -> Command:
    if _flag(conf, "template"):
        raise NotModelled("templates (Proxmox starts them with a minimized config)")
    version = machine_version(conf, facts)
    q35 = is_q35(conf)
    sockets = int(conf.get("sockets") or 1)
    cores = int(conf.get("cores") or 1)
    maxcpus = sockets * cores
    vcpus = int(conf.get("vcpus") or maxcpus)
    run_dir = "/var/run/qemu-server"
    cmd = [
        binary,
        "-name", conf.get("name") or f"vm{vmid}",
        "-no-shutdown",
        "-chardev", f"socket,id=qmp,path={facts.path(f'{run_dir}/{vmid}.qmp')},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", facts.path(f"{run_dir}/{vmid}.pid"),
        "-daemonize",
        "-smp", f"{vcpus},sockets={sockets},cores={cores},maxcpus={maxcpus}",
        "-nodefaults",
    ]
    memory, machine_flags = memory_args(conf, sockets, cores, facts)
    cmd += memory
    bridges: set[int] = set()
    devices: list[str] = []
    if q35:
        cfg = "pve-q35-4.0.cfg" if min_version(version, 4, 0) else "pve-q35.cfg"
        devices += ["-readconfig", facts.path(f"/usr/share/qemu-server/{cfg}")]
    balloon = conf.get("balloon")
    if balloon is None or balloon != "0":
        text = f"virtio-balloon-pci,id=balloon0{print_pci_addr('balloon0', bridges)}"
        if min_version(version, 6, 2):
            text += ",free-page-reporting=on"
        devices += ["-device", text]
    devices += net_args(vmid, conf, version, bridges, facts)
    if not q35 and min_version(version, 2, 3):
        bridges |= {1, 2}
    front = []
    for k in sorted(b for b in bridges if b > 0 and not (q35 and b < 4)):
        front += ["-device", f"pci-bridge,id=pci.{k},chassis_nr={k}{print_pci_addr(f'pci.{k}', set())}"]
    devices = front + devices
    cmd += devices
    cmd += ["-machine", ",".join([*machine_flags, f"type={qemu_machine_name(conf)}", *machine_extra])]
    return Command(tuple(cmd), tuple(split_args(conf.get("args", ""))))
