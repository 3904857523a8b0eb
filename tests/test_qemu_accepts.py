"""Real QEMU (Debian 12's 7.2 or Debian 13's 10.0, TCG, paused) takes the planned args on
Proxmox-like command lines.

Both socket roles: backend ovs (QEMU listens and waits for OVS; here a test vhost-user
backend connects) and backend external (QEMU connects; with `reconnect` it retries while
the server socket is missing and does not finish starting until it can connect, which is
why pre-start refuses a start whose external switch does not listen yet). QEMU itself also pins the platform facts the
planner relies on: it refuses a taken PCI slot, a backend size other than -m, and
`-machine memory-backend` next to `-numa memdev`.

Where the two QEMUs differ, QEMU_PINS holds what each does; a QEMU of any other version
fails these tests until someone has looked at it and added its line.
"""

import dataclasses
from pathlib import Path

import pytest

from fixtures.qemu import QEMU
from fixtures.vhost_user_stub import VhostUserStub
from pve_vhost_agent.plan.args import plan_args
from pve_vhost_agent.errors import ConfigConflict, MemoryLayoutError
from pve_vhost_agent.adapters.qemu import installed_version
from pve_vhost_agent.model.spec import Backend, VhostNic, VmSpec

MEMORY_MIB = 128
# Proxmox's own net0 (a user netdev stands in for its tap), at the slot PCI.pm gives it.
PROXMOX_NET0 = ["-netdev", "user,id=net0",
                "-device", "virtio-net-pci,mac=BC:24:11:00:00:01,netdev=net0,bus=pci.0,addr=0x12,id=net0"]
CONFIG = {"memory": str(MEMORY_MIB), "balloon": "0", "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"}
# Where qemu-server's PCI.pm puts netN: the slot the planner must have picked.
EXPECTED_SLOT = {1: ("pci.0", 0x13), 5: ("pci.0", 0x17), 6: ("pci.1", 0x1), 31: ("pci.1", 0x1a)}


@dataclasses.dataclass(frozen=True)
class QemuPin:
    """What one QEMU version does where versions differ (measured on Debian's packages)."""

    reconnect: str  # the client socket's reconnect option the agent must plan for it
    other: str  # the other spelling
    refuses_other: str | None  # what QEMU says when refusing `other`; None: it takes it too
    client_filename: str  # how query-chardev names a connected client socket ({sock}: its path)


QEMU_PINS = {
    # Debian 12 (Proxmox VE 8's base): `reconnect` in seconds; no reconnect-ms yet.
    (7, 2): QemuPin("reconnect=1", "reconnect-ms=1000", "Invalid parameter 'reconnect-ms'", "unix:"),
    # Debian 13 (Proxmox VE 9's base): reconnect-ms since 9.2; `reconnect`, deprecated since
    # 9.2, is still taken without a word (removed in a later QEMU, hence reconnect-ms from 9.2 on).
    (10, 0): QemuPin("reconnect-ms=1000", "reconnect=1", None, "unix:{sock}"),
}


def qemu_pin() -> QemuPin:
    version = installed_version(QEMU)
    assert version[:2] in QEMU_PINS, (
        f"no pinned behaviour for QEMU {version}: measure it and add it to QEMU_PINS")
    return QEMU_PINS[version[:2]]


def nic(index, backend=Backend.OVS, **kw):
    return VhostNic(100, index, "vhubr0", f"02:00:00:00:00:{index:02X}", backend=backend, **kw)


def socket_dirs(folder: Path) -> dict:
    dirs = {backend: folder / backend.value for backend in Backend}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return dirs


def device_at(qmp, ident: str) -> tuple[str, int, int]:
    """(bus id, slot, function) of a device, as QEMU placed it (works while paused)."""
    bus = qmp.command("qom-get", path=f"/machine/peripheral/{ident}", property="parent_bus")
    devfn = qmp.command("qom-get", path=f"/machine/peripheral/{ident}", property="addr")
    return bus.rsplit("/", 1)[-1], devfn >> 3, devfn & 7


def check_running_plan(qmp, spec: VmSpec, dirs, stubs) -> None:
    chardevs = {c["label"]: c["filename"] for c in qmp.command("query-chardev")}
    for vnic in spec.nics:
        ident = f"vhu-net{vnic.index}"
        sock = dirs[vnic.backend] / vnic.socket_name
        # Connected: QEMU drops the "disconnected:" prefix. As server it names the listening
        # path; as client 7.2 names its own unnamed end ("unix:"), 10.0 the server's path.
        client = qemu_pin().client_filename.format(sock=sock)
        assert chardevs[ident] == (f"unix:{sock},server=on" if vnic.backend is Backend.OVS else client)
        assert stubs[vnic.index].connections == 1 and stubs[vnic.index].path == sock
        bus, slot = EXPECTED_SLOT[vnic.index]
        assert device_at(qmp, ident) == (bus, slot, 0)
        props = {name: qmp.command("qom-get", path=f"/machine/peripheral/{ident}", property=name)
                 for name in ("mac", "mq", "host_mtu", "rx_queue_size", "tx_queue_size")}
        assert props == {"mac": vnic.mac.lower(), "mq": vnic.queues > 1, "host_mtu": vnic.mtu or 0,
                         "rx_queue_size": vnic.rx_queue_size, "tx_queue_size": vnic.tx_queue_size}
        # One call eventfd per virtqueue: QEMU set up every queue pair of the NIC.
        assert stubs[vnic.index].requests.count("SET_VRING_CALL") == 2 * vnic.queues
    (memdev,) = qmp.command("query-memdev")
    assert (memdev["id"], memdev["size"], memdev["share"]) == ("vhu-mem", MEMORY_MIB << 20, True)


def connect_ovs_stubs(stubs, dirs, spec: VmSpec) -> None:
    """Like OVS's dpdkvhostuserclient ports: connect to each socket once QEMU listens."""
    for vnic in spec.nics:
        stubs[vnic.index] = VhostUserStub(dirs[Backend.OVS] / vnic.socket_name)
        stubs[vnic.index].connect_in_background()


def refusal(vm) -> str:
    """QEMU must exit with an error: what it said."""
    assert vm.wait_exit() != 0
    return vm.stderr


@pytest.fixture
def stubs():
    started = {}
    yield started
    for stub in started.values():
        stub.close()


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_qemu_as_socket_server_accepts_the_plan_once_ovs_connects(machine, qemu, short_tmp, stubs):
    dirs = socket_dirs(short_tmp)
    spec = VmSpec(100, (nic(1), nic(6, queues=2, mtu=9000, rx_queue_size=512), nic(31)))
    plan = plan_args(spec, CONFIG, installed_version(QEMU), dirs)
    connect_ovs_stubs(stubs, dirs, spec)
    vm = qemu.start(PROXMOX_NET0 + list(plan.args), machine=machine, memory_mib=MEMORY_MIB)
    qmp = vm.qmp()
    check_running_plan(qmp, spec, dirs, stubs)
    assert qmp.command("query-status")["status"] == "prelaunch"


def test_qemu_as_socket_server_waits_for_the_backend(qemu, short_tmp, stubs):
    dirs = socket_dirs(short_tmp)
    spec = VmSpec(100, (nic(5),))
    plan = plan_args(spec, CONFIG, installed_version(QEMU), dirs)
    vm = qemu.start(PROXMOX_NET0 + list(plan.args))
    sock = dirs[Backend.OVS] / "vm-100-5.sock"
    # QEMU listens, and blocks in netdev setup: no monitor, nothing done yet.
    vm.wait_for(lambda: "QEMU waiting for connection on: disconnected:unix:" + str(sock) in vm.stderr,
                what="QEMU waiting for its vhost-user client")
    stubs[5] = VhostUserStub(sock)
    stubs[5].connect()
    check_running_plan(vm.qmp(), spec, dirs, stubs)


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_qemu_as_client_does_not_finish_starting_until_the_server_socket_exists(machine, qemu, short_tmp, stubs):
    dirs = socket_dirs(short_tmp)
    spec = VmSpec(100, (nic(1, Backend.EXTERNAL, queues=4), nic(6, Backend.EXTERNAL)))
    plan = plan_args(spec, CONFIG, installed_version(QEMU), dirs)
    assert plan.args[5].endswith(f",{qemu_pin().reconnect}")
    vm = qemu.start(PROXMOX_NET0 + list(plan.args), machine=machine, memory_mib=MEMORY_MIB)
    first = dirs[Backend.EXTERNAL] / "vm-100-1.sock"
    vm.wait_for(lambda: f"Failed to connect to '{first}': No such file or directory" in vm.stderr,
                what="a first connection attempt")
    # It keeps retrying and never gets to its monitor: on Proxmox, `qm start` would hang.
    with pytest.raises(AssertionError, match="no QMP greeting after"):
        vm.qmp(timeout=3)
    for vnic in spec.nics:  # now VPP (here: the stub) creates its server sockets
        stubs[vnic.index] = VhostUserStub(dirs[Backend.EXTERNAL] / vnic.socket_name)
        stubs[vnic.index].listen()
    qmp = vm.qmp()  # QEMU completed its initialisation only now
    check_running_plan(qmp, spec, dirs, stubs)
    assert qmp.command("query-status")["status"] == "prelaunch"


def test_the_installed_qemu_takes_the_reconnect_spelling_planned_for_its_version(qemu, short_tmp, stubs):
    """Why the plan depends on the installed version: 7.2 refuses reconnect-ms, and 10.0 takes
    reconnect-ms (its old `reconnect` only as a deprecated spelling that later QEMUs drop)."""
    pin = qemu_pin()
    spec = VmSpec(100, (nic(1, Backend.EXTERNAL),))
    planned_dirs, other_dirs = socket_dirs(short_tmp / "planned"), socket_dirs(short_tmp / "other")
    planned = plan_args(spec, CONFIG, installed_version(QEMU), planned_dirs)
    assert planned.args[5].endswith(f",{pin.reconnect}")
    other = tuple(arg.replace(pin.reconnect, pin.other) for arg in
                  plan_args(spec, CONFIG, installed_version(QEMU), other_dirs).args)
    assert other[5].endswith(f",{pin.other}")
    for key, dirs in enumerate((planned_dirs, other_dirs)):  # the external switch listens
        stubs[key] = VhostUserStub(dirs[Backend.EXTERNAL] / "vm-100-1.sock")
        stubs[key].listen()
    vm = qemu.start(list(planned.args))
    assert vm.qmp().command("query-status")["status"] == "prelaunch"  # started and connected
    assert vm.stderr == ""  # not even a deprecation warning
    if pin.refuses_other:
        assert pin.refuses_other in refusal(qemu.start(list(other)))
    else:
        vm = qemu.start(list(other))
        assert vm.qmp().command("query-status")["status"] == "prelaunch"


def test_qemu_refuses_a_nic_at_a_slot_proxmox_already_uses(qemu, short_tmp, stubs):
    dirs = socket_dirs(short_tmp)
    spec = VmSpec(100, (nic(0),))
    with pytest.raises(ConfigConflict, match="net0 of VM 100 is both a Proxmox NIC"):
        plan_args(spec, CONFIG, installed_version(QEMU), dirs)
    # Planned as if net0 were free, QEMU meets Proxmox's own net0 at the same slot.
    free = {k: v for k, v in CONFIG.items() if k != "net0"}
    plan = plan_args(spec, free, installed_version(QEMU), dirs)
    connect_ovs_stubs(stubs, dirs, spec)
    said = refusal(qemu.start(PROXMOX_NET0 + list(plan.args)))
    assert "PCI: slot 18 function 0 not available for virtio-net-pci, in use by virtio-net-pci,id=net0" in said


def test_qemu_refuses_a_memory_backend_of_another_size_than_m(qemu, short_tmp, stubs):
    dirs = socket_dirs(short_tmp)
    spec = VmSpec(100, (nic(1),))
    plan = plan_args(spec, {**CONFIG, "memory": "256"}, installed_version(QEMU), dirs)
    connect_ovs_stubs(stubs, dirs, spec)
    said = refusal(qemu.start(list(plan.args), memory_mib=128))  # -m 128, backend 256M
    assert "Machine memory size does not match the size of the memory backend" in said


def test_qemu_refuses_machine_memory_backend_next_to_numa_memdev(qemu, short_tmp, stubs):
    dirs = socket_dirs(short_tmp)
    spec = VmSpec(100, (nic(1),))
    with pytest.raises(MemoryLayoutError, match="numa on without hugepages"):
        plan_args(spec, {**CONFIG, "numa": "1"}, installed_version(QEMU), dirs)
    # What Proxmox adds for numa: 1 (one node here), then the memfd plan of a numa: 0 VM.
    proxmox_numa = ["-object", f"memory-backend-ram,id=ram-node0,size={MEMORY_MIB}M",
                    "-numa", "node,nodeid=0,cpus=0,memdev=ram-node0"]
    plan = plan_args(spec, CONFIG, installed_version(QEMU), dirs)
    connect_ovs_stubs(stubs, dirs, spec)
    said = refusal(qemu.start(proxmox_numa + list(plan.args)))
    assert "'-machine memory-backend' and '-numa memdev' properties are mutually exclusive" in said
