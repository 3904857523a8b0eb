"""What a Proxmox VM config says about the things the agent plans around.

Pure: takes the key/value mapping of a VM config section (usually the *effective* view,
with `[PENDING]` applied, since that is what the next start uses) and reads its NICs,
memory layout and machine type the way qemu-server does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from pve_vhost_agent.errors import ConfigConflict
from pve_vhost_agent.model.names import nic_index
from pve_vhost_agent.model.spec import is_decimal

DEFAULT_MEMORY_MIB = 512  # qemu-server's default when `memory` is absent
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 16, 8 * 1024 * 1024  # qemu-server's own bounds for `memory`
_VIRTIOFS_KEY = re.compile(r"^virtiofs[0-9]+$")
# NIC models qemu-server knows; `virtio=MAC` is the legacy spelling of model + macaddr.
NET_MODELS = ("virtio", "e1000", "e1000-82540em", "e1000-82544gc", "e1000-82545em", "e1000e",
              "i82551", "i82557b", "i82559er", "ne2k_isa", "ne2k_pci", "pcnet", "rtl8139",
              "vmxnet3")


def parse_property_string(value: str, default_key: str | None = None) -> dict[str, str]:
    """Proxmox property string `a=1,b=2` (first item may omit `default_key=`)."""
    props: dict[str, str] = {}
    for i, item in enumerate(value.split(",")):
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep:
            if i == 0 and default_key:
                key, val = default_key, item
            else:
                val = ""
        props[key.strip()] = val.strip()
    return props


@dataclasses.dataclass(frozen=True)
class NetDevice:
    """One `netN:` line of a VM config (only the fields the agent reads)."""

    index: int
    model: str
    mac: str
    bridge: str = ""
    tag: int | None = None
    trunks: str = ""
    firewall: bool = False


def parse_net(index: int, value: str) -> NetDevice:
    props = parse_property_string(value)
    model, mac = "", ""
    for name in NET_MODELS:
        if name in props:
            model, mac = name, props[name]
            break
    model = props.get("model", model)
    mac = props.get("macaddr", mac)
    tag = props.get("tag")
    return NetDevice(
        index=index,
        model=model,
        mac=mac.upper(),
        bridge=props.get("bridge", ""),
        tag=int(tag) if tag and is_decimal(tag) else None,
        trunks=props.get("trunks", ""),
        firewall=props.get("firewall", "0") == "1",
    )


def net_devices(config: Mapping[str, str]) -> dict[int, NetDevice]:
    """Every `netN` of the config, by N."""
    nets = {}
    for key, value in config.items():
        index = nic_index(key)
        if index is not None:
            nets[index] = parse_net(index, value)
    return dict(sorted(nets.items()))


def _flag(config: Mapping[str, str], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None or value == "":
        return default
    return value.strip() not in ("0", "no", "off", "false")


def hotplug_items(config: Mapping[str, str]) -> list[str]:
    """`hotplug:` as qemu-server reads it: `1` is network,disk,usb (the default), `0` none."""
    value = config.get("hotplug", "").strip()
    if value == "1":
        return ["network", "disk", "usb"]
    if value == "0":
        return []
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclasses.dataclass(frozen=True)
class MemoryLayout:
    """How qemu-server will lay out guest memory for this config."""

    memory_mib: int
    numa: bool
    hugepages: str | None  # "2", "1024", "any" or None
    memory_hotplug: bool
    balloon: bool  # a virtio-balloon device will be present
    virtiofs: bool

    @property
    def proxmox_shares_memory(self) -> bool:
        """True when Proxmox's own backend is already `share=on` (vhost-user needs it)."""
        return (self.numa and self.hugepages is not None) or self.virtiofs


def memory_layout(config: Mapping[str, str]) -> MemoryLayout:
    raw = config.get("memory")
    if raw is None or raw.strip() == "":
        mib = DEFAULT_MEMORY_MIB
    else:
        current = parse_property_string(raw, default_key="current").get("current", "")
        if not is_decimal(current) or not MIN_MEMORY_MIB <= int(current) <= MAX_MEMORY_MIB:
            raise ConfigConflict(
                f"memory {raw!r} in the VM config is not a size Proxmox accepts "
                f"({MIN_MEMORY_MIB}-{MAX_MEMORY_MIB} MiB)",
                "fix it with `qm set <vmid> --memory <MiB>`",
            )
        mib = int(current)
    # Proxmox adds the balloon device unless `balloon: 0`.
    balloon_value = config.get("balloon")
    balloon = balloon_value is None or balloon_value.strip() != "0"
    hugepages = config.get("hugepages") or None
    return MemoryLayout(
        memory_mib=mib,
        numa=_flag(config, "numa", False),
        hugepages=hugepages.strip() if hugepages else None,
        memory_hotplug="memory" in hotplug_items(config),
        balloon=balloon,
        # qemu-server counts a virtiofsN only when its value is true to Perl (not "" or "0").
        virtiofs=any(_VIRTIOFS_KEY.match(k) and v.strip() not in ("", "0") for k, v in config.items()),
    )


def machine_type(config: Mapping[str, str]) -> str:
    """`q35` or `pc` (i440fx): the family decides PCI topology; the version does not here."""
    machine = parse_property_string(config.get("machine", ""), default_key="type").get("type", "")
    return "q35" if "q35" in machine else "pc"
