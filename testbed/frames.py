"""Raw Ethernet frames in and out of a network namespace, with the standard library only.

`FrameProbe(netns, ifname)` starts this file as a small helper process inside the
namespace (`ip netns exec`); the helper holds one AF_PACKET socket on the interface and
answers two commands on stdin: `send HEX` and `collect SRC TIMEOUT` (every test frame
received since the last collect, up to the first one from MAC SRC, or until TIMEOUT).

The kernel moves a received frame's outer VLAN tag into packet metadata (so do transmits
through a device that offloads the tag, like veth); `read_frame` puts it back from
PACKET_AUXDATA (tp_vlan_tci, and tp_vlan_tpid when TP_STATUS_VLAN_TPID_VALID says it is
set), so a test sees the frame as on the wire. A test in the same namespace (say in a
real-kernel guest, tests/fixtures/kernelvm.py) uses the socket directly:
`capture_socket(ifname)`, `collect(sock, src, timeout)`, `tag_text(frame)` -> "88a8/100 8100/10".
Test frames use source MACs 02:68:33:... ("h3"); other traffic is ignored, unless the
probe is given another source prefix (`sources=`, e.g. a guest's own MAC).

`answer(frame, peer_ip, peer_mac)` is a peer that answers a guest's ARP requests and
ICMP echo requests with the same VLAN tags (this host kernel has no VLAN devices).
No pytest here: the tests (tests/fixtures/frames.py) and the demo use it.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
TEST_MAC_PREFIX = bytes.fromhex("026833")
BROADCAST = b"\xff" * 6
ETHERTYPE = 0x88B5  # IEEE local experimental
TPID = {"802.1q": 0x8100, "802.1ad": 0x88A8}


def mac(n: int) -> bytes:
    return TEST_MAC_PREFIX + n.to_bytes(3, "big")


def frame(src: bytes, *tags: tuple[int, int], payload: bytes = b"h3 test frame") -> bytes:
    """A broadcast frame from `src` with VLAN tags given as (tpid, vid), outermost first."""
    header = BROADCAST + src + b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in tags)
    return (header + struct.pack("!H", ETHERTYPE) + payload).ljust(60, b"\0")


def tags_of(data: bytes) -> list[tuple[int, int]]:
    """The VLAN tags of a frame as (tpid, vid), outermost first."""
    tags, offset = [], 12
    while struct.unpack_from("!H", data, offset)[0] in (0x8100, 0x88A8):
        tpid, tci = struct.unpack_from("!HH", data, offset)
        tags.append((tpid, tci & 0x0FFF))
        offset += 4
    return tags


def tag_text(data: bytes) -> str:
    """The VLAN tags of a frame as text, outermost first: "88a8/100 8100/10" ("" untagged)."""
    return " ".join(f"{tpid:04x}/{vid}" for tpid, vid in tags_of(data))


class FrameProbe:
    """The test side: a helper process in `netns` bound to `ifname`."""

    def __init__(self, netns: str, ifname: str, sources: bytes = TEST_MAC_PREFIX):
        self.name = f"{netns}/{ifname}"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-u", __file__, ifname, sources.hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._ask("ready")

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"frame probe {self.name} died (exit {self.proc.wait()})")
        return answer.strip()

    def send(self, data: bytes) -> None:
        self._ask(f"send {data.hex()}")

    def collect(self, until_src: bytes, timeout: float = 5.0) -> list[bytes]:
        """Frames received since the last call, up to the first one from `until_src`."""
        return [bytes.fromhex(h) for h in json.loads(self._ask(f"collect {until_src.hex()} {timeout}"))]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


# --- one AF_PACKET socket, in this process ---------------------------------------------


def capture_socket(ifname: str) -> socket.socket:
    """An AF_PACKET socket on `ifname` for every protocol, with PACKET_AUXDATA on; it also
    sends (raw frames, as given, out of `ifname`)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sock.bind((ifname, 0))
    return sock


def read_frame(sock: socket.socket, deadline: float) -> tuple[bytes, int] | None:
    """(frame with its outer VLAN tag put back, packet type) of the next frame on `sock`,
    or None at `deadline` (time.monotonic()). The packet type is socket.PACKET_HOST,
    PACKET_BROADCAST, ..., or PACKET_OUTGOING for a frame the interface sent."""
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        data, ancdata, _flags, addr = sock.recvmsg(65535, socket.CMSG_SPACE(20))
    except socket.timeout:
        return None
    for level, kind, cdata in ancdata:
        if level == SOL_PACKET and kind == PACKET_AUXDATA:
            # struct tpacket_auxdata: status, len, snaplen, mac, net, vlan_tci, vlan_tpid
            status, _len, _snap, _mac, _net, tci, tpid = struct.unpack("IIIHHHH", cdata[:20])
            if status & TP_STATUS_VLAN_VALID:
                tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100
                data = data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
    return data, addr[2]


def collect(sock: socket.socket, until_src: bytes, timeout: float = 5.0, *, outgoing: bool = False,
            sources: bytes = TEST_MAC_PREFIX) -> list[bytes]:
    """Test frames (source MAC starting with `sources`, 02:68:33:... by default) read from
    `sock` up to the first one from `until_src`, or until `timeout` s passed. Frames the
    interface sent itself count only with `outgoing=True` (capturing what a device puts on
    the wire)."""
    deadline, seen = time.monotonic() + timeout, []
    while (got := read_frame(sock, deadline)) is not None:
        data, kind = got
        if data[6:6 + len(sources)] == sources and (outgoing or kind != PACKET_OUTGOING):
            seen.append(data)
            if data[6:12] == until_src:
                break
    return seen


# --- a peer that answers ----------------------------------------------------------------


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def answer(data: bytes, peer_ip: str, peer_mac: bytes) -> bytes | None:
    """The peer's reply to a guest's ARP request or ICMP echo request for `peer_ip`,
    with the same VLAN tags, or None for any other frame."""
    at = 12 + 4 * len(tags_of(data))
    guest_mac, tags, ethertype, body = data[6:12], data[12:at], data[at:at + 2], data[at + 2:]
    peer = bytes(map(int, peer_ip.split(".")))
    head = guest_mac + peer_mac + tags + ethertype
    if ethertype == b"\x08\x06" and body[6:8] == b"\x00\x01" and body[24:28] == peer:
        sender, sender_ip = body[8:14], body[14:18]
        return (head + body[:6] + b"\x00\x02" + peer_mac + peer + sender + sender_ip).ljust(60, b"\0")
    if ethertype == b"\x08\x00" and len(body) > 20 and body[9] == 1 and body[16:20] == peer:
        ihl = (body[0] & 0x0F) * 4
        length = struct.unpack_from("!H", body, 2)[0]
        if body[ihl] != 8:  # not an echo request
            return None
        ip = bytearray(body[:ihl])
        ip[12:16], ip[16:20], ip[10:12] = body[16:20], body[12:16], b"\0\0"
        ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
        icmp = bytearray(body[ihl:length])
        icmp[0], icmp[2:4] = 0, b"\0\0"
        icmp[2:4] = struct.pack("!H", _checksum(bytes(icmp)))
        return (head + bytes(ip) + bytes(icmp)).ljust(60, b"\0")
    return None


# --- the helper, run inside the namespace ---------------------------------------------


def main(ifname: str, sources: bytes = TEST_MAC_PREFIX) -> None:
    sock = capture_socket(ifname)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "send":
            sock.send(bytes.fromhex(args[0]))
            print("ok")
        elif command == "collect":
            seen = collect(sock, bytes.fromhex(args[0]), float(args[1]), sources=sources)
            print(json.dumps([data.hex() for data in seen]))
        else:
            print("ready")


if __name__ == "__main__":
    main(sys.argv[1], bytes.fromhex(sys.argv[2]) if len(sys.argv) > 2 else TEST_MAC_PREFIX)
