"""The stand-in's `pve-bridge` / `pve-bridgedown`: QEMU runs them for each tap NIC.

As qemu-server's scripts and pve-common's `tap_create`/`tap_plug`/`tap_unplug` do for an
OVS bridge: read `netN` of the VM config (from the source node's folder when
PVE_MIGRATED_FROM is set), bring the tap up with the bridge's MTU, delete any old port of
that name, then `ovs-vsctl add-port` with `tag=`, `trunks=` and `vlan_mode=native-untagged`
when both are set, and `mtu_request=` the bridge MTU. pve-bridgedown deletes the port.
Firewall bridges (fwbr/fwln), Linux bridges, SDN and rate limits are not modelled.

Each node gets small executable wrappers at <root>/usr/libexec/qemu-server/ (written by
`layout.Cluster.add_node`) that call `main` with the node's root, name and OVSDB socket.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pvestandin import cmdline, vmconfig

_TAP = re.compile(r"^tap(\d+)i(\d+)$")


class PlugError(Exception):
    pass


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _vsctl(ovsdb: str, *args: str) -> list[str]:
    return ["ovs-vsctl", f"--db={ovsdb}", "--timeout=10", *args]


def bridge_mtu(bridge: str) -> int:
    """`read_bridge_mtu`, in this process's network namespace."""
    result = _run(["ip", "-json", "link", "show", "dev", bridge])
    if result.returncode != 0:
        raise PlugError(f"bridge '{bridge}' does not exist")
    return int(json.loads(result.stdout)[0]["mtu"])


def net_config(root: Path, node: str, vmid: int, netid: str, migrated_from: str | None) -> dict[str, str]:
    conf = vmconfig.load(root / "etc/pve/nodes" / (migrated_from or node) / "qemu-server" / f"{vmid}.conf")
    value = conf.main.get(netid)
    if not migrated_from and netid in conf.pending:
        value = conf.pending[netid]
    if value is None:
        raise PlugError(f"unable to get network config '{netid}'")
    return cmdline.parse_net(value)


def plug(iface: str, *, root: Path, node: str, ovsdb: str | None, migrated_from: str | None) -> None:
    match = _TAP.match(iface)
    if not match:
        raise PlugError(f"got strange interface name '{iface}'")
    net = net_config(root, node, int(match.group(1)), f"net{match.group(2)}", migrated_from)
    bridge = net.get("bridge")
    if not bridge:
        raise PlugError("unable to get bridge setting")
    if net.get("firewall", "0") != "0":
        raise PlugError("the stand-in does not model firewall bridges (firewall=1)")
    mtu = bridge_mtu(bridge)
    result = _run(["ip", "link", "set", iface, "up", "promisc", "on", "mtu", str(mtu)])
    if result.returncode != 0:
        raise PlugError(f"interface activation failed: {result.stderr.strip()}")
    if ovsdb is None or _run(_vsctl(ovsdb, "br-exists", bridge)).returncode != 0:
        raise PlugError(f"bridge '{bridge}' is not an OVS bridge of this node (Linux bridges are not modelled)")
    _run(_vsctl(ovsdb, "del-port", iface))  # pve-common ignores this one's errors
    tag, trunks = net.get("tag"), net.get("trunks", "").replace(";", ",")
    cmd = _vsctl(ovsdb, "--", "add-port", bridge, iface)
    if tag:
        cmd.append(f"tag={tag}")
    if trunks:
        cmd.append(f"trunks={trunks}")
    if tag and trunks:
        cmd.append("vlan_mode=native-untagged")
    cmd += ["--", "set", "Interface", iface, f"mtu_request={mtu}"]
    result = _run(cmd)
    if result.returncode != 0:
        raise PlugError(f"can't add ovs port '{iface}' - {result.stderr.strip()}")


def unplug(iface: str, *, ovsdb: str | None) -> None:
    if not _TAP.match(iface):
        raise PlugError(f"got strange interface name '{iface}'")
    if ovsdb is not None:
        _run(_vsctl(ovsdb, "del-port", iface))  # errors ignored, as pve-common does


def main(argv: list[str], *, root: str, node: str, ovsdb: str | None, down: bool = False) -> int:
    if not argv:
        print("no interface specified", file=sys.stderr)
        return 1
    try:
        if down:
            unplug(argv[0], ovsdb=ovsdb)
        else:
            plug(argv[0], root=Path(root), node=node, ovsdb=ovsdb,
                 migrated_from=os.environ.get("PVE_MIGRATED_FROM") or None)
    except (PlugError, OSError, ValueError, cmdline.ConfigError, cmdline.NotModelled) as err:
        print(err, file=sys.stderr)
        return 1
    return 0
