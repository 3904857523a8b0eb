"""Every name the agent makes or recognises, formatted and parsed in one place.

A name made from a VM id and a NIC index (a socket file, an OVS port, Proxmox's tap, a
spec section id) has one template here; its parser is derived from that template and
accepts only what the template makes (no leading zeros, indexes 0-31), so formatting and
parsing cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import re

MAX_NICS = 32  # Proxmox's net0 .. net31
MAX_DIGITS = 10  # a VM id has at most 9 digits, a NIC index 2


class VmNicName:
    """A name built from `{vmid}` and `{index}` (or `{index}` alone)."""

    def __init__(self, template: str):
        self.template = template
        pattern = re.escape(template)
        for field in ("vmid", "index"):
            # Bounded: a name of 5,000 digits is not one of these (and int() would refuse it).
            pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>[0-9]{{1,{MAX_DIGITS}}})")
        self._pattern = pattern  # compiled at its first parse (re's cache): most never parse

    def __call__(self, vmid: int | None = None, index: int = 0) -> str:
        return self.template.format(vmid=vmid, index=index)

    def parse(self, name: str) -> tuple[int | None, int] | None:
        """(vmid, index) for a name this template makes; None for anything else."""
        match = re.fullmatch(self._pattern, name)
        if not match:
            return None
        fields = match.groupdict()
        vmid = int(fields["vmid"]) if "vmid" in fields else None
        index = int(fields["index"])
        if index >= MAX_NICS or self(vmid, index) != name:
            return None
        return vmid, index


SOCKET = VmNicName("vm-{vmid}-{index}.sock")  # vhost-user socket file, as in the TNSR recipe
VHOST_PORT = VmNicName("vhu{vmid}i{index}")  # the agent's OVS port (and interface), like Proxmox's taps
TAP = VmNicName("tap{vmid}i{index}")  # Proxmox's tap device of netN (pve-common)
SECTION = VmNicName("{vmid}-net{index}")  # a spec file section id
NIC = VmNicName("net{index}")  # a NIC key of a VM config
ARGS_NIC_ID = VmNicName("vhu-net{index}")  # id of the chardev, netdev and device of a vhost-user NIC

ARGS_PREFIX = "vhu-"  # every id or reference in args starting with this is the agent's
ARGS_MEMORY_ID = "vhu-mem"  # the shared guest memory backend
LINK_HUB_BASE = 1000  # a link end netN's device sits on QEMU hub 1000+N (hub ids 1000-1031)

# Patterns are kept as text: re compiles (and caches) each at its first use, so a hook pays
# only for those its VM needs.

# Guest-side devices Proxmox makes (VM taps, container veths, firewall links): never uplinks.
_GUEST_DEVICE = r"(tap|veth|fwln|fwpr)[0-9]+[iop][0-9]+"
_FIREWALL_BRIDGE = r"fwbr[0-9]+i[0-9]+"  # pve-common's bridge between a tap and its firewall

MAX_IFNAME = 15  # the kernel's limit for a network device name (IFNAMSIZ 16, with the NUL)

# Linux-bridge QinQ: the devices the agent makes for one S-VLAN of one of Proxmox's Linux
# bridges are named after that bridge, as Proxmox names its own VLAN bridge `vmbr0v950`:
# `<bridge><a|q><S-tag>` is the S-VLAN bridge (a for an 802.1ad S-tag, q for 802.1q), and
# a role letter after it names its other devices.
SVLAN_ROLES = {
    "": "S-VLAN bridge",
    "u": "S-VLAN device",  # pushes and pops the S-tag (on the uplink, or on the veth peer)
    "t": "veth end in the bridge",  # carries the S-VLAN in the bridge's own VLAN (same TPID)
    "p": "veth peer",  # the S-VLAN device's lower device on that path
}
_TPID_LETTER = {"802.1ad": "a", "802.1q": "q"}
_SVLAN_NAME = r"(?P<bridge>.+)(?P<tpid>[aq])(?P<stag>[1-9][0-9]{0,3})(?P<role>[utp]?)"

HOOK_NAME = "pve-vhost-agent"  # the hookscript's file name in a storage's snippets/


def socket_name(vmid: int, index: int) -> str:
    return SOCKET(vmid, index)


def socket_vmid(name: str) -> int | None:
    """The VM whose NIC socket `name` is (None for any name `socket_name` does not make)."""
    parsed = SOCKET.parse(name)
    return parsed[0] if parsed else None


def vhost_port(vmid: int, index: int) -> str:
    return VHOST_PORT(vmid, index)


def tap_device(vmid: int, index: int) -> str:
    return TAP(vmid, index)


def nic_name(index: int) -> str:
    return NIC(None, index)


def nic_index(name: str) -> int | None:
    """`net3` -> 3; None for anything that is not net0 .. net31."""
    parsed = NIC.parse(name)
    return parsed[1] if parsed else None


def args_nic_id(index: int) -> str:
    return ARGS_NIC_ID(None, index)


def args_nic_index(ident: str) -> int | None:
    """`vhu-net3` -> 3; None for any other id."""
    parsed = ARGS_NIC_ID.parse(ident)
    return parsed[1] if parsed else None


def is_guest_device(name: str) -> bool:
    """A device Proxmox made for a guest (tap, veth, firewall link), never a host uplink."""
    return bool(re.fullmatch(_GUEST_DEVICE, name))


def is_firewall_bridge(name: str) -> bool:
    """`fwbr<vmid>i<N>`: Proxmox put the NIC's firewall between its tap and the bridge."""
    return bool(re.fullmatch(_FIREWALL_BRIDGE, name))


def svlan_device(bridge: str, ethertype: str, stag: int, role: str = "") -> str:
    """The agent's device of `role` (see SVLAN_ROLES) for S-VLAN `stag` with TPID
    `ethertype` ("802.1ad" or "802.1q") on Proxmox's Linux bridge `bridge`; it may be
    longer than MAX_IFNAME (the caller refuses such a bridge name)."""
    if role not in SVLAN_ROLES:
        raise ValueError(f"unknown S-VLAN device role {role!r}")
    return f"{bridge}{_TPID_LETTER[ethertype]}{stag}{role}"


def parse_svlan_device(name: str) -> tuple[str, str, int, str] | None:
    """(bridge, ethertype, S-tag, role) of a name `svlan_device` makes; None otherwise."""
    match = re.fullmatch(_SVLAN_NAME, name)
    if not match:
        return None
    ethertype = next(e for e, letter in _TPID_LETTER.items() if letter == match["tpid"])
    parsed = (match["bridge"], ethertype, int(match["stag"]), match["role"])
    return parsed if svlan_device(*parsed) == name else None


def pve_vlan_bridge(bridge: str, tag: int) -> str:
    """The bridge pve-common makes for VLAN `tag` of a traditional (not VLAN-aware) bridge
    (activate_bridge_vlan), with `<uplink>.<tag>` as its port: a tap with tag=<tag> sits there."""
    return f"{bridge}v{tag}"


def hook_volume(storage: str) -> str:
    """The agent's hookscript as a VM config names it (`<storage>:snippets/<file>`)."""
    return f"{storage}:snippets/{HOOK_NAME}"


def is_agent_hook(value: str | None) -> bool:
    """True for a `hookscript:` value naming the agent's hookscript, on any storage."""
    return bool(value) and value.split(":", 1)[-1] == f"snippets/{HOOK_NAME}"


def vm_port_names(vmid: int) -> tuple[str, ...]:
    """Every OVS port name that can be the VM's: its vhost-user ports and Proxmox's taps."""
    return tuple(VHOST_PORT(vmid, i) for i in range(MAX_NICS)) + tuple(TAP(vmid, i) for i in range(MAX_NICS))


# --- VM-to-VM links ------------------------------------------------------------------

_END = r"([0-9]{1,9}):net([0-9]{1,2})"


def end_name(vmid: int, index: int) -> str:
    """A link end as the operator writes it: `100:net2`."""
    return f"{vmid}:{nic_name(index)}"


def parse_end_name(text: str) -> tuple[int, int] | None:
    """`100:net2` -> (100, 2); None for anything `end_name` does not make."""
    match = re.fullmatch(_END, text.strip())
    if not match:
        return None
    vmid, index = int(match[1]), int(match[2])
    return (vmid, index) if index < MAX_NICS and end_name(vmid, index) == text.strip() else None


def link_hub(index: int) -> int:
    """The QEMU hub id of link end netN (the device's netdev is a port of it)."""
    return LINK_HUB_BASE + index


# A link end's live UDP socket is a pair of netdevs QEMU gets at run time (never in args):
# `vhu-udp<N>-<local>-<remote>` (the socket) on hub port `vhu-hup<N>-<local>-<remote>`,
# each address written as <hex of the IP>-<port>, so QEMU's own list of netdevs says
# where each end points.
_LINK_NETDEV = (r"vhu-(udp|hup)([0-9]{1,2})-([0-9a-f]{8}|[0-9a-f]{32})-([0-9]{1,5})"
                r"-([0-9a-f]{8}|[0-9a-f]{32})-([0-9]{1,5})")
Address = tuple[str, int]  # (IP address as text, UDP port)


def _hexip(ip: str) -> str:
    return ipaddress.ip_address(ip).packed.hex()


def _iphex(text: str) -> str:
    return str(ipaddress.ip_address(bytes.fromhex(text)))


def link_netdevs(index: int, local: Address, remote: Address) -> tuple[str, str]:
    """(socket netdev id, hub port id) of link end netN bound to `local`, sending to `remote`."""
    tag = f"{_hexip(local[0])}-{local[1]}-{_hexip(remote[0])}-{remote[1]}"
    return f"vhu-udp{index}-{tag}", f"vhu-hup{index}-{tag}"


def parse_link_netdev(name: str) -> tuple[str, int, Address, Address] | None:
    """('udp' or 'hup', N, local, remote) for an id `link_netdevs` makes; None otherwise."""
    match = re.fullmatch(_LINK_NETDEV, name)
    if not match:
        return None
    kind, index = match[1], int(match[2])
    local, remote = (_iphex(match[3]), int(match[4])), (_iphex(match[5]), int(match[6]))
    if index >= MAX_NICS or link_netdevs(index, local, remote)[0 if kind == "udp" else 1] != name:
        return None
    return kind, index, local, remote
