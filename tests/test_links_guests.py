"""Frames through VM-to-VM links, between real guests (slow: TCG, two guests at a time).

The stand-in cluster of tests/test_links.py (two nodes, each in its own network
namespace, joined by a veth as their cluster network) starts each VM as Proxmox would:
the hook's pre-start checks the args, QEMU runs the link guest (fixtures/linkguest.py:
Debian's kernel, busybox, a bridge module and a small LLDP tool), and post-start gives
each link end its socket. Each test holds two of the machine's guest slots.

- one node: the guests ping each other; LLDP frames to 01:80:c2:00:00:0e arrive from
  the peer and none comes back to its sender; both guests' STP bridges agree on one root
  (BPDUs pass); restarting one end's QEMU brings the link back without touching the other;
- two nodes: ping and LLDP across the cluster network; a datagram from any other source
  than the peer end reaches nothing, while the same datagram sent to a plain
  `-netdev dgram` of QEMU's own (a control NIC in the user's args) reaches its guest.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import time

import pytest

from fixtures.kernelvm import _guest_slot
from fixtures.linkguest import Console, kernel_command_line, link_image, lldp_senders, parse_fields  # noqa: F401
from test_links import Lab, ends_of, lab  # noqa: F401  (the module's two-node cluster)

pytestmark = pytest.mark.slow

BOOT = 240  # seconds from QEMU's start to the guest's first reply, on a busy 2-core machine
STRAY = "02:57:00:00:00:01"  # what the test sends from a wrong source
CONTROL = "02:57:00:00:00:02"  # what it sends to QEMU's own -netdev dgram
PRIO_ROOT = 4096


@contextlib.contextmanager
def two_guests():
    """Two of the machine-wide guest slots (more TCG guests starve a 2-core machine)."""
    with _guest_slot(), _guest_slot():
        yield


def guest_vm(lab: Lab, node: str, name: str, image, append: str, extra_args: str = "") -> tuple[int, Console]:
    vmid = lab.vm(node, name)
    console = lab.nodes[node].path(f"/run/h11lk-console-{vmid}.log")
    args = (f"-kernel {image.kernel} -initrd {image.initrd} -append {shlex.quote(append)} "
            f"-serial file:{console} -no-reboot {extra_args}").strip()
    path = lab.nodes[node].vm_conf(vmid)
    path.write_text(path.read_text().replace("memory: 128", "memory: 256") + f"args: {args}\n")
    return vmid, Console(console)


def start(lab: Lab, node: str, vmid: int):
    return lab.qm(node, paused=False).start(vmid)


def wait_all(consoles: dict[str, Console], word: str, timeout: float) -> dict[str, str]:
    return {name: console.wait(word, timeout) for name, console in consoles.items()}


def mac_of(lab: Lab, vmid: int, nic: str = "net2") -> str:
    return ends_of(lab, vmid)[nic]["mac"].lower()


def test_one_node_ping_lldp_stp_and_a_restart_of_one_end(lab, link_image):
    steps = "ping,lldp,stp,hold"
    x, cx = guest_vm(lab, "pve1", "leaf", link_image, kernel_command_line(
        steps, addr="10.9.0.1/24", peer="10.9.0.2", prio=PRIO_ROOT, lldp=6, hold=600))
    y, cy = guest_vm(lab, "pve1", "spine", link_image, kernel_command_line(
        steps, addr="10.9.0.2/24", peer="10.9.0.1", lldp=6, hold=600))
    lab.cli("pve1", "link", "add", f"{x}:net2", f"{y}:net2")
    for vmid in (x, y):
        lab.cli("pve1", "enable", str(vmid))
    consoles = {"x": cx, "y": cy}
    try:
        with two_guests():
            began = time.monotonic()
            first_x, first_y = start(lab, "pve1", x), start(lab, "pve1", y)
            wait_all(consoles, "reply", BOOT)
            booted = time.monotonic() - began
            lldp = wait_all(consoles, "linkprobe: lldp", 60)
            for me, peer in (("x", y), ("y", x)):
                fields, heard = parse_fields(lldp[me]), lldp_senders(lldp[me])
                assert fields["self"] == "0", lldp[me]  # none of its own frames came back
                assert list(heard) == [mac_of(lab, peer)] and heard[mac_of(lab, peer)] >= 5, lldp[me]
            stp = {name: parse_fields(line) for name, line in wait_all(consoles, "stp", 60).items()}
            root = f"{PRIO_ROOT:04x}.{mac_of(lab, x).replace(':', '')}"
            assert stp["x"]["root"] == stp["y"]["root"] == root == stp["x"]["bridge"], stp
            assert stp["y"]["bridge"] != root and stp["y"]["port"] == "3", stp  # y's port forwards to the root
            cx.wait("holding", 30)

            # y's QEMU restarts (a stop, a cold start): x is not touched, and the link is back.
            x_sockets = lab.sockets("pve1", x)
            lab.qm("pve1").stop(y)
            again = start(lab, "pve1", y)
            assert "re-point" not in again.task.text, again.task.text
            cy.wait("reply", BOOT)  # x answers from its bridge, which kept forwarding
            second = parse_fields(cy.wait("stp", 90))
            assert second["root"] == root, second
            assert lab.qm("pve1").pid(x) == first_x.pid and lab.sockets("pve1", x) == x_sockets
            assert first_y.pid != again.pid
            print(f"\n[links, one node] two guests to first reply {booted:.0f} s; {lldp['x']}; {lldp['y']}")
    except AssertionError as err:
        raise AssertionError(f"{err}\nconsole x:\n{cx.text()}\nconsole y:\n{cy.text()}") from err
    finally:
        for vmid in (x, y):
            lab.qm("pve1").stop(vmid)


def send_datagrams(lab: Lab, node: str, source: tuple[str, int], target: tuple[str, int], src_mac: str) -> None:
    """Three LLDP frames from `src_mac` in UDP datagrams from `source` (port 0: any) to `target`."""
    frame = bytes.fromhex("0180c200000e" + src_mac.replace(":", "") + "88cc") + bytes(46)
    code = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(({source[0]!r}, {source[1]}))\n"
            f"for _ in range(3):\n    s.sendto(bytes.fromhex({frame.hex()!r}), ({target[0]!r}, {target[1]})); "
            "time.sleep(0.2)\n")
    subprocess.run([*lab.nodes[node].enter(), "/usr/bin/python3", "-c", code], check=True, timeout=30)


def test_two_nodes_ping_lldp_and_no_stray_datagram(lab, link_image):
    control_port = 40000  # QEMU's own -netdev dgram on the far node (the test's namespace: no clash)
    control = (f"-netdev dgram,id=ctl,local.type=inet,local.host=10.0.11.2,local.port={control_port},"
               f"remote.type=inet,remote.host=10.0.11.1,remote.port={control_port} "
               "-device virtio-net-pci,netdev=ctl,mac=02:57:00:00:00:fe,bus=pci.0,addr=0x15")
    x, cx = guest_vm(lab, "pve1", "leaf", link_image, kernel_command_line(
        "ping,lldp,hold", addr="10.9.1.1/24", peer="10.9.1.2", lldp=40, hold=600))
    y, cy = guest_vm(lab, "pve2", "spine", link_image, kernel_command_line(
        "ping,listen", addr="10.9.1.2/24", peer="10.9.1.1", listen=40), control)
    lab.cli("pve1", "link", "add", f"{x}:net2", f"{y}:net2")
    lab.cli("pve1", "enable", str(x))
    lab.cli("pve2", "enable", str(y))
    y_port = int(ends_of(lab, y)["net2"]["port"])
    try:
        with two_guests():
            start(lab, "pve1", x)
            started_y = start(lab, "pve2", y)
            assert f"link net2 to {x}:net2 on node pve1: UDP 10.0.11.2:{y_port}" in started_y.task.text
            wait_all({"x": cx, "y": cy}, "reply", BOOT)
            deadline = time.monotonic() + 60
            while "linkprobe: listening" not in cy.text():
                assert time.monotonic() < deadline, cy.text()
                time.sleep(0.1)
            send_datagrams(lab, "pve2", ("10.0.11.2", 0), ("10.0.11.2", y_port), STRAY)  # right address, wrong port
            send_datagrams(lab, "pve1", ("10.0.11.1", 0), ("10.0.11.2", y_port), STRAY)  # from x's node, wrong port
            send_datagrams(lab, "pve1", ("10.0.11.1", 0), ("10.0.11.2", control_port), CONTROL)
            deadline = time.monotonic() + 30
            while not {("eth0", mac_of(lab, x)), ("eth1", CONTROL)} <= set(cy.heard()):
                assert time.monotonic() < deadline, cy.text()
                time.sleep(0.2)
            time.sleep(2)  # anything sent earlier has long arrived
            heard = set(cy.heard())
            assert ("eth0", mac_of(lab, x)) in heard  # x's LLDP frames cross the cluster network
            assert ("eth1", CONTROL) in heard  # QEMU's own dgram delivers a datagram from anyone
            assert all(source != STRAY for _iface, source in heard), heard  # the agent's socket does not
            print(f"\n[links, two nodes] y heard {sorted(heard)}")
    except AssertionError as err:
        raise AssertionError(f"{err}\nconsole x:\n{cx.text()}\nconsole y:\n{cy.text()}") from err
    finally:
        lab.qm("pve1").stop(x)
        lab.qm("pve2").stop(y)
