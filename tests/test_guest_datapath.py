"""A real guest sends and receives through the agent's vhost-user port (the data path).

Only a running virtio-net driver proves that the agent's args make a working NIC: guest
memory must be shared with OVS-DPDK, or the vhost-user backend sees nothing, often with
no error. Each test does what a Proxmox start does: the agent's OVS plan is applied
(pre-start), then QEMU starts with the args planner's line for a Proxmox-like i440fx VM
(numa 0, balloon 0: a memfd backend with share=on), and boots Debian's kernel with a
busybox initramfs (fixtures/guest.py) that pings a peer behind the same OVS bridge.

- access VLAN: a network namespace on the same VLAN answers the pings;
- QinQ: the NIC is a dot1q-tunnel port (S-tag 950, 802.1q or 802.1ad); the guest pings
  from its own VLAN 10, the peer sits on a trunk port and sees (and answers) 950/10
  double-tagged frames through a raw socket (this host kernel has no VLAN devices);
- negative control: the same guest with `share=off` memory gets no replies.

While the guest holds its link after the first reply, OVS must report the port
`status=connected`; then the peer goes silent and the guest powers off.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time

import pytest

from fixtures.frames import TPID, FrameProbe, answer, tags_of
from fixtures.guest import (NO_REPLY, READY, RELEASED, REPLY, TEST_MACHINE_ONLY, Guest, boot,
                            kernel_command_line)
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.adapters.ovsdb import Ovsdb
from pve_vhost_agent.plan.ovs import plan_vhost_ports, plan_vm_removal
from pve_vhost_agent.adapters.qemu import installed_version
from pve_vhost_agent.settings import Settings
from pve_vhost_agent.model.spec import Backend, EtherType, QinQ, VhostNic, VlanPolicy, VmSpec

pytestmark = pytest.mark.slow

# What `qm config` shows for a small Proxmox VM on i440fx, numa off, no ballooning.
VM_CONFIG = {"memory": "256", "balloon": "0", "numa": "0", "cores": "1", "sockets": "1",
             "ostype": "l26", "machine": "pc", "name": "h7gu-guest"}
GUEST_IP, PEER_IP = "192.0.2.2", "192.0.2.1"  # TEST-NET-1, inside private namespaces only
BRIDGE, PEER_PORT = "h7gubr0", "h7gupeer"  # in the session's OVS-DPDK; each test removes them
PEER_MAC = bytes.fromhex("026833070001")  # 02:68:33 is what fixtures.frames listens for
BOOT = 90  # seconds from QEMU start to the guest's first marker, on a busy 2-core machine
PING_WINDOW = 15  # seconds the guest pings before it gives up (its first ping is answered here)
HOLD = 60  # seconds the guest keeps its link up after a reply, unless the peer goes silent


@dataclasses.dataclass
class Lab:
    """The session's OVS-DPDK, the agent's OVSDB connection, and a place for QEMU."""

    ovs: object
    db: Ovsdb
    runner: object
    image: object
    nic: VhostNic | None = None
    peer_netns: str = ""

    def agent_prepares(self, nic: VhostNic) -> tuple[str, ...]:
        """The agent's pre-start OVS step for `nic`, and the args it plans for the VM."""
        self.nic = nic
        settings = Settings(root=self.runner.folder / "root")
        sockets = {backend: settings.socket_dir(backend.value) for backend in Backend}
        sockets[Backend.OVS].mkdir(parents=True, exist_ok=True)
        spec = VmSpec(nic.vmid, (nic,))
        self.db.apply(plan_vhost_ports(spec, self.db.snapshot(), sockets[Backend.OVS]))
        args = plan_args(spec, VM_CONFIG, installed_version("qemu-system-x86_64"), sockets).args
        assert f"memory-backend-memfd,id=vhu-mem,size={VM_CONFIG['memory']}M,share=on" in args, args
        # The launcher's MSI-X workaround belongs to this test machine, never to the agent's line.
        assert not any("vectors=" in arg for arg in args) and TEST_MACHINE_ONLY[0] not in args, args
        return args

    def plug_peer(self, *port_settings: str) -> str:
        """A network namespace on a veth into the NIC's bridge (port settings as for ovs-vsctl)."""
        self.peer_netns = f"{self.ovs.netns}-h7gu"
        self.ovs.plug_namespace(PEER_PORT, self.peer_netns)
        self.ovs.vsctl("add-port", self.nic.bridge, PEER_PORT, *port_settings)
        return self.peer_netns

    def peer_ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.peer_netns, *args], check=True, capture_output=True, timeout=20)

    def boot(self, args, *, vlan: int | None = None) -> Guest:
        append = kernel_command_line(f"{GUEST_IP}/24", PEER_IP, vlan=vlan, timeout=PING_WINDOW, hold=HOLD)
        return boot(self.runner, self.image, append, args, int(VM_CONFIG["memory"]))

    def vhost_status(self) -> dict:
        iface = self.db.snapshot().port(self.nic.port_name).interface
        return {**iface.status, "error": iface.error} if iface else {}

    def wait_connected(self, timeout: float = 10) -> dict:
        """The port's Interface.status once OVS says connected (vswitchd fills it on its own time)."""
        deadline = time.monotonic() + timeout
        while (status := self.vhost_status()).get("status") != "connected":
            assert time.monotonic() < deadline, f"OVS never reported the vhost-user port connected: {status}"
            time.sleep(0.1)
        return status


@pytest.fixture
def lab(ovs_dpdk, guest_image, guest_runner):
    with Ovsdb(ovs_dpdk.remote, timeout=10) as db:
        lab = Lab(ovs_dpdk, db, guest_runner, guest_image)
        try:
            yield lab
        finally:
            guest_runner.stop_all()  # by PID, before its port goes away
            if lab.peer_netns:
                ovs_dpdk.unplug_namespace(lab.peer_netns)
            if lab.nic:
                db.apply(plan_vm_removal(lab.nic.vmid, db.snapshot()))  # post-stop
                ovs_dpdk.vsctl("--if-exists", "del-br", lab.nic.bridge)


def report(guest: Guest, name: str, total: float) -> None:
    print(f"\n[{name}] QEMU start to poweroff {total:.1f} s; {guest.marker(READY)}; "
          f"{guest.marker(REPLY, NO_REPLY)}")


def test_a_guest_on_the_agents_vhost_user_port_pings_its_vlan(lab):
    nic = VhostNic(7101, 0, BRIDGE, "02:68:33:07:01:00", vlan=VlanPolicy(tag=20))
    args = lab.agent_prepares(nic)
    lab.plug_peer("tag=20")
    lab.peer_ip("addr", "add", f"{PEER_IP}/24", "dev", "eth0")

    guest = lab.boot(args)
    line = guest.wait_marker(REPLY, NO_REPLY, timeout=BOOT + PING_WINDOW)
    assert line.startswith(REPLY), guest.console()
    status = lab.wait_connected()  # the guest holds its link while the peer answers
    assert status["mode"] == "client" and status["error"] == "", status
    lab.peer_ip("link", "set", "eth0", "down")  # the peer goes silent: the guest powers off
    guest.wait_marker(RELEASED, timeout=30)
    report(guest, "access VLAN 20", guest.wait_poweroff(30))


@pytest.mark.parametrize("ethertype", [EtherType.DOT1Q, EtherType.DOT1AD], ids=lambda e: e.value)
def test_qinq_a_guests_vlan_10_rides_s_tag_950_to_a_trunk(lab, ethertype):
    nic = VhostNic(7102, 0, BRIDGE, "02:68:33:07:02:00", vlan=VlanPolicy(qinq=QinQ(950, (), ethertype)))
    guest_mac = bytes.fromhex(nic.mac.replace(":", ""))
    args = lab.agent_prepares(nic)
    probe = FrameProbe(lab.plug_peer(), "eth0")  # a trunk port: every VLAN, tags kept
    try:
        guest = lab.boot(args, vlan=10)
        seen_tags = set()
        answering = True
        deadline = time.monotonic() + BOOT + PING_WINDOW + HOLD
        while guest.marker(RELEASED, NO_REPLY) is None:
            assert guest.process.alive() and time.monotonic() < deadline, guest.console()
            for data in probe.collect(guest_mac, timeout=0.3):
                if data[6:12] == guest_mac:
                    seen_tags.add(tuple(tags_of(data)))
                    if answering and (reply := answer(data, PEER_IP, PEER_MAC)):
                        probe.send(reply)
            if answering and guest.marker(REPLY):
                lab.wait_connected()
                answering = False  # the peer goes silent: the guest powers off
        assert guest.marker(REPLY), guest.console()
        # Every frame of the guest left OVS with S-tag 950 (the port's TPID) around its C-tag 10,
        # and the answers, sent back with the same tags, reached the guest's VLAN 10.
        assert seen_tags == {((TPID[ethertype.value], 950), (0x8100, 10))}, seen_tags
        report(guest, f"QinQ 950/10 {ethertype.value}", guest.wait_poweroff(30))
    finally:
        probe.close()


def test_control_unshared_guest_memory_gives_the_guest_no_traffic_and_ovs_no_error(lab):
    """Why the planner adds share=on: with share=off the same guest hears nothing, yet
    OVS shows the port connected and no error."""
    nic = VhostNic(7103, 0, BRIDGE, "02:68:33:07:03:00", vlan=VlanPolicy(tag=20))
    args = lab.agent_prepares(nic)
    unshared = tuple(a.replace(",share=on", ",share=off") for a in args)  # the test's change, not the planner's
    lab.plug_peer("tag=20")
    lab.peer_ip("addr", "add", f"{PEER_IP}/24", "dev", "eth0")

    guest = lab.boot(unshared)
    statuses = []
    deadline = time.monotonic() + BOOT + PING_WINDOW
    while (line := guest.marker(REPLY, NO_REPLY)) is None:
        assert guest.process.alive() and time.monotonic() < deadline, guest.console()
        statuses.append(lab.vhost_status())
        time.sleep(0.2)
    assert line.startswith(NO_REPLY) and statuses, guest.console()
    assert {"status": "connected", "error": ""}.items() <= statuses[-1].items(), statuses[-1]
    report(guest, "share=off control", guest.wait_poweroff(30))
