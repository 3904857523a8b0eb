"""A Proxmox-like root folder for the agent's `--root`, with no Proxmox and no pytest.

What the agent reads on a node, written directly so that hundreds of VMs cost little:
`etc/pve/nodes/<node>/qemu-server/<vmid>.conf` (and the `etc/pve/qemu-server` link to
this node's folder, as pmxcfs has), `etc/pve/priv/lock` for the cluster lock, and the
cluster-wide spec files `etc/pve/pve-vhost-agent/<vmid>.cfg` (README, "Cluster-wide spec files";
formatted in `format_spec` only, so a change of the storage changes one function).

Stand-in running VMs: Proxmox (and the agent) count a VM as running when
`var/run/qemu-server/<vmid>.pid` names a live process started with `-pidfile <that file>`.
`StandinVms` starts one tiny process per VM for that: `sh -c 'read _' qemu -pidfile PATH`,
a dash blocked in its `read` builtin (no child process) on a pipe whose write end only the
caller holds, so a thousand VMs cost a thousand small processes, and all of them end when
the caller closes the pipe or dies. `serve_sockets` leaves the socket files QEMU serves in
`run/pve-vhost-agent/ovs/` (bound unix sockets; nothing listens, as with a QEMU that has
not yet accepted: the agent only checks that the file is a socket).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable

CHECKOUT = Path(__file__).resolve().parent.parent
HOOK_LINE = "hookscript: local:snippets/pve-vhost-agent"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
AGENT_PYTHON = "/usr/bin/python3"  # Debian's, with python3-openvswitch (never the pyenv one)


@dataclasses.dataclass(frozen=True)
class VhostNicDecl:
    """One declared vhost-user NIC (access VLAN `tag`, backend ovs, defaults otherwise)."""
    vmid: int
    index: int
    bridge: str
    tag: int | None = 10

    @property
    def mac(self) -> str:
        """Locally administered and unique per (vmid, index) for vmid < 2**24."""
        v = self.vmid
        return f"02:{(v >> 16) & 255:02X}:{(v >> 8) & 255:02X}:{v & 255:02X}:00:{self.index:02X}"


def format_spec(nics: Iterable[VhostNicDecl]) -> dict[int, str]:
    """Each VM's declarations file (`etc/pve/pve-vhost-agent/<vmid>.cfg`): Proxmox section
    config, one `vhostuser: <vmid>-net<N>` section per NIC, `<tab><key> <value>` lines, a
    blank line after each, sorted by NIC."""
    files: dict[int, list[str]] = {}
    for nic in sorted(nics, key=lambda n: (n.vmid, n.index)):
        lines = [f"vhostuser: {nic.vmid}-net{nic.index}", f"\tbridge {nic.bridge}", f"\tmac {nic.mac}"]
        if nic.tag is not None:
            lines.append(f"\ttag {nic.tag}")
        files.setdefault(nic.vmid, []).append("\n".join(lines) + "\n\n")
    return {vmid: "".join(sections) for vmid, sections in files.items()}


def vm_config(vmid: int, memory: int = 1024, hookscript: bool = True) -> str:
    """A router VM like examples/100.conf: i440fx (no machine line), balloon 0, net0 a
    Proxmox tap NIC; vhost-user NICs come from the spec as net1 and up."""
    lines = [
        "balloon: 0",
        "boot: order=scsi0",
        "cores: 2",
        "cpu: host",
        *([HOOK_LINE] if hookscript else []),
        f"memory: {memory}",
        f"name: bench-{vmid}",
        f"net0: virtio=BC:24:11:{(vmid >> 16) & 255:02X}:{(vmid >> 8) & 255:02X}:{vmid & 255:02X},bridge=vmbr0,tag=100",
        "ostype: l26",
        f"scsi0: local-lvm:vm-{vmid}-disk-0,size=32G",
        "scsihw: virtio-scsi-single",
    ]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class PveNode:
    """A private root (/tmp/<prefix>-*) seen by the agent as node `node`, OVSDB `ovsdb`."""
    root: Path
    node: str
    ovsdb: str
    checkout: Path = CHECKOUT

    @classmethod
    def create(cls, prefix: str, node: str, ovsdb: str, checkout: Path = CHECKOUT) -> "PveNode":
        root = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
        (root / "etc/pve/nodes" / node / "qemu-server").mkdir(parents=True)
        (root / "etc/pve/qemu-server").symlink_to(f"nodes/{node}/qemu-server")
        (root / "etc/pve/priv/lock").mkdir(parents=True)
        # The hookscript runs isolated (python3 -I) and finds the package under its root.
        (root / "usr/lib/python3/dist-packages").mkdir(parents=True)
        (root / "usr/lib/python3/dist-packages/pve_vhost_agent").symlink_to(checkout / "pve_vhost_agent")
        # What pmxcfs always serves (the agent takes a folder without it for pve-cluster down).
        (root / "etc/pve/.version").write_text('{\n"starttime": 0\n}\n')
        return cls(root, node, ovsdb, checkout)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- files

    @property
    def spec_dir(self) -> Path:
        return self.root / "etc/pve/pve-vhost-agent"

    def vm_path(self, vmid: int, node: str | None = None) -> Path:
        return self.root / "etc/pve/nodes" / (node or self.node) / "qemu-server" / f"{vmid}.conf"

    def write_vm(self, vmid: int, text: str, node: str | None = None) -> None:
        path = self.vm_path(vmid, node)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def write_spec(self, nics: Iterable[VhostNicDecl]) -> None:
        """Replace every VM's declarations file (each written and renamed, as the agent does)."""
        if self.spec_dir.exists():
            shutil.rmtree(self.spec_dir)
        self.spec_dir.mkdir(parents=True)
        self.add_spec(nics)

    def add_spec(self, nics: Iterable[VhostNicDecl]) -> None:
        """Write the declarations files of these NICs' VMs, leaving the others."""
        for vmid, text in format_spec(nics).items():
            tmp = self.spec_dir / f".{vmid}.cfg.bench-tmp"
            tmp.write_text(text)
            os.replace(tmp, self.spec_dir / f"{vmid}.cfg")

    def pidfile(self, vmid: int) -> Path:
        return self.root / "var/run/qemu-server" / f"{vmid}.pid"

    def socket_path(self, vmid: int, index: int) -> Path:
        """Where QEMU serves NIC net<index>'s socket (backend ovs)."""
        return self.root / "run/pve-vhost-agent/ovs" / f"vm-{vmid}-{index}.sock"

    def serve_sockets(self, vmid: int, indexes: Iterable[int]) -> None:
        for index in indexes:
            path = self.socket_path(vmid, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.bind(str(path))

    # -- the agent's command line

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of an agent process (a hook gets LC_ALL=C, as Proxmox adds it)."""
        return {"PATH": SYSTEM_PATH, "LC_ALL": "C", "PYTHONPATH": str(self.checkout),
                "PVE_VHOST_AGENT_ROOT": str(self.root), "PVE_VHOST_AGENT_OVSDB": self.ovsdb,
                "PVE_VHOST_AGENT_NODE": self.node, **extra}

    def argv(self, *args: str) -> list[str]:
        return [AGENT_PYTHON, "-m", "pve_vhost_agent", *args]

    def hookscript(self, vmid: int, phase: str) -> list[str]:
        """The hookscript as Proxmox runs it: the file itself, `<vmid> <phase>`."""
        return [str(self.checkout / "hookscripts" / "pve-vhost-agent"), str(vmid), phase]

    def agent(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the CLI; a failure raises with its output."""
        result = subprocess.run(self.argv(*args), env=self.env(), cwd=self.root, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode:
            raise RuntimeError(f"pve-vhost-agent {' '.join(args)} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result


class StandinVms:
    """Stand-in QEMU processes for "running" VMs of a PveNode (see the module's doc)."""

    def __init__(self, node: PveNode):
        self.node = node
        self._read, self._write = os.pipe()
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, vmid: int) -> None:
        pidfile = self.node.pidfile(vmid)
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(["/bin/sh", "-c", "read _", "qemu", "-pidfile", str(pidfile)],
                                stdin=self._read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pidfile.write_text(f"{proc.pid}\n")
        self.procs[vmid] = proc

    def stop(self, vmid: int) -> None:
        proc = self.procs.pop(vmid)
        proc.kill()
        proc.wait(timeout=10)
        self.node.pidfile(vmid).unlink(missing_ok=True)

    def stop_all(self) -> None:
        """Close the pipe (each `read` ends), then make sure by PID."""
        if self._write >= 0:
            os.close(self._write)
            os.close(self._read)
            self._write = self._read = -1
        deadline = time.monotonic() + 10
        for vmid, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
            self.node.pidfile(vmid).unlink(missing_ok=True)
        self.procs.clear()
