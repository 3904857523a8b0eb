"""Private Open vSwitch instances: ovsdb-server + ovs-vswitchd, userspace or DPDK (no pytest).

Each instance lives in its own temp folder (/tmp/h3-*) and its ovs-vswitchd in its own
network namespace (two userspace vswitchd in one namespace collide on their ovs-netdev
tap). Everything is stopped by the PIDs from its pidfiles. tests/fixtures/ovs.py turns
this into pytest fixtures; the demo and the bench use it directly.

`start_ovs(..., mount_ns=...)` runs ovs-vswitchd inside a given mount namespace as well
(a /proc/PID/ns/mnt path): it then opens vhost-user socket paths as the processes in that
namespace see them (a stand-in node's own view of a common path, tests/pvestandin/hostns.py).

An instance offers `remote` (unix:PATH for --ovsdb), `run_dir`, `netns`, `vsctl()`,
`appctl()`, `ip()`, `log()` and `wait_for_log()`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PREFIX = "h3"
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
DPDK_VSWITCHD = Path("/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk")
TIMEOUT = 20  # seconds for any single OVS command in a fixture


def run(*args: str, env: dict | None = None, timeout: float = TIMEOUT) -> str:
    result = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def _plain(value):
    """OVSDB JSON (["map", ...], ["set", ...], ["uuid", ...]) as plain Python."""
    if isinstance(value, list):
        kind, body = value
        if kind == "map":
            return {_plain(k): _plain(v) for k, v in body}
        if kind == "set":
            return [_plain(v) for v in body]
        return body  # uuid / named-uuid
    return value


def alive(pid: int) -> bool:
    """False once the process is gone or a zombie (PID 1 here reaps late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # reaped before open, or between open and read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclasses.dataclass
class OvsInstance:
    run_dir: Path
    netns: str
    dpdk_prefix: str = ""
    pids: dict[str, int] = dataclasses.field(default_factory=dict)
    namespaces: list[str] = dataclasses.field(default_factory=list)  # made by plug_namespace

    @property
    def db_sock(self) -> Path:
        return self.run_dir / "db.sock"

    @property
    def remote(self) -> str:
        return f"unix:{self.db_sock}"

    @property
    def env(self) -> dict:
        d = str(self.run_dir)
        return {**os.environ, "OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d, "OVS_PKGDATADIR": str(SCHEMA.parent)}

    def vsctl(self, *args: str) -> str:
        """ovs-vsctl against this instance (tests use it to set up and to observe)."""
        return run("ovs-vsctl", f"--db={self.remote}", f"--timeout={TIMEOUT}", *args, env=self.env)

    def vsctl_batched(self, commands: list[list[str]], batch: int = 500, timeout: float = 900,
                      options: tuple[str, ...] = ()) -> None:
        """Many ovs-vsctl commands (each a list of words) in few calls: `batch` commands per
        call, joined with `--`, each call one transaction that waits for ovs-vswitchd (unless
        `options` holds --no-wait)."""
        for start in range(0, len(commands), batch):
            words: list[str] = []
            for command in commands[start:start + batch]:
                words += ["--", *command]
            run("ovs-vsctl", f"--db={self.remote}", f"--timeout={int(timeout)}", *options, *words, env=self.env,
                timeout=timeout + 10)

    def add_dummy_ports(self, bridge: str, names: list[str], batch: int = 5000) -> None:
        """Ports of type `dummy` (ovs-vswitchd --enable-dummy): no kernel device, no traffic.
        One big transaction is cheaper than several: ovs-vswitchd's reconfiguration of a
        netdev bridge grows faster than linearly with its ports (~0.5 s at 1,000, ~5 s at 3,000)."""
        self.vsctl_batched([["add-port", bridge, name, "--", "set", "Interface", name, "type=dummy"]
                            for name in names], batch)

    def get(self, table: str, record: str, *columns: str) -> dict:
        """One row as plain Python (maps as dicts, sets as lists), read with ovs-vsctl."""
        out = json.loads(self.vsctl("--format=json", f"--columns={','.join(columns)}", "list", table, record))
        return dict(zip(out["headings"], (_plain(v) for v in out["data"][0])))

    def find(self, table: str, *conditions: str) -> list[str]:
        """Names of the rows that match, e.g. find("Interface", "name=vhu100i0")."""
        out = json.loads(self.vsctl("--format=json", "--columns=name", "find", table, *conditions))
        return sorted(row[0] for row in out["data"])

    def appctl(self, *args: str, target: str = "ovs-vswitchd") -> str:
        return run("ovs-appctl", "-t", target, f"--timeout={TIMEOUT}", *args, env=self.env)

    def ip(self, *args: str) -> str:
        """`ip` inside the vswitchd's network namespace."""
        return run("ip", "-n", self.netns, *args)

    def plug_namespace(self, port: str, netns: str, ifname: str = "eth0") -> None:
        """A veth pair: `port` in vswitchd's namespace (to add to a bridge), `ifname` in a new `netns`."""
        run("ip", "netns", "add", netns)
        self.namespaces.append(netns)
        self.ip("link", "add", port, "type", "veth", "peer", "name", ifname, "netns", netns)
        self.ip("link", "set", port, "up")
        run("ip", "-n", netns, "link", "set", ifname, "up")

    def unplug_namespace(self, netns: str) -> None:
        """Delete a namespace from plug_namespace (its veth pair goes with it)."""
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        if netns in self.namespaces:
            self.namespaces.remove(netns)

    def log(self, daemon: str = "ovs-vswitchd") -> str:
        return (self.run_dir / f"{daemon}.log").read_text()

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear in ovs-vswitchd.log within {timeout} s")
            time.sleep(0.05)
        return log

    def stop(self, graceful: bool = True) -> None:
        """Ask nicely first (exit --cleanup removes the datapath), then by PID. `graceful=False`
        sends SIGTERM instead: quicker with thousands of ports, whose cleanup takes long."""
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            pid = self.pids.get(daemon)
            if pid and alive(pid):
                if not graceful:
                    os.kill(pid, signal.SIGTERM)
                    continue
                args = ("exit", "--cleanup") if daemon == "ovs-vswitchd" else ("exit",)
                subprocess.run(["ovs-appctl", "-t", str(self.run_dir / f"{daemon}.{pid}.ctl"), "--timeout=10", *args],
                               env=self.env, capture_output=True, timeout=TIMEOUT)
        for pid in self.pids.values():
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for netns in [*self.namespaces, self.netns]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        if self.dpdk_prefix:
            shutil.rmtree(f"/var/run/dpdk/{self.dpdk_prefix}", ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def start_ovs(kind: str = "ovs", *, dpdk: bool = False, dummy: bool = False,
              other_config: dict[str, str] | None = None, mount_ns: str | None = None) -> OvsInstance:
    """Start a private ovsdb-server and ovs-vswitchd; other_config is set before vswitchd runs.
    With `mount_ns`, ovs-vswitchd also runs inside that mount namespace."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{kind}-", dir="/tmp"))
    suffix = run_dir.name.rsplit("-", 1)[1]
    inst = OvsInstance(run_dir, f"{PREFIX}-{kind}-{suffix}", f"{PREFIX}{kind}{suffix}" if dpdk else "")
    try:
        run("ip", "netns", "add", inst.netns)
        run("ip", "-n", inst.netns, "link", "set", "lo", "up")
        db = run_dir / "conf.db"
        run("ovsdb-tool", "create", str(db), str(SCHEMA))
        run("ovsdb-server", str(db), f"--remote=punix:{inst.db_sock}",
            "--remote=db:Open_vSwitch,Open_vSwitch,manager_options", "-vconsole:off",
            "--pidfile", "--detach", "--log-file", env=inst.env)
        inst.pids["ovsdb-server"] = int((run_dir / "ovsdb-server.pid").read_text())
        config = {}
        if dpdk:
            config.update({
                "dpdk-init": "true",
                # No hugepages, no NICs; --legacy-mem, or OVS adds --in-memory and the EAL refuses.
                "dpdk-extra": f"--no-pci --no-huge --legacy-mem -m 1024 --file-prefix {inst.dpdk_prefix}",
                "pmd-maxsleep": "50000",  # an idle PMD thread would eat a whole core
                "per-port-memory": "true",  # else the first vhost port stalls vswitchd for ~5 s
            })
        config.update(other_config or {})  # a test may change the DPDK settings too (dpdk-init=try)
        settings = [f"other_config:{k}={v}" for k, v in config.items()]
        inst.vsctl("--no-wait", "init", *(["--", "set", "Open_vSwitch", ".", *settings] if settings else []))
        binary = "ovs-vswitchd"
        if dpdk:
            # A symlink named ovs-vswitchd keeps the pidfile and ovs-appctl names right.
            binary = str(run_dir / "ovs-vswitchd")
            os.symlink(DPDK_VSWITCHD, binary)
        # nsenter opens the netns file here, before it enters the mount namespace.
        enter = (["nsenter", f"--mount={mount_ns}", f"--net=/run/netns/{inst.netns}", "--"] if mount_ns
                 else ["ip", "netns", "exec", inst.netns])
        run(*enter, binary, inst.remote, "-vconsole:off",
            "--pidfile", "--detach", "--log-file", *(["--enable-dummy"] if dummy else []),
            env=inst.env, timeout=60)
        inst.pids["ovs-vswitchd"] = int((run_dir / "ovs-vswitchd.pid").read_text())
        if dpdk and config["dpdk-init"] == "true":
            inst.vsctl("wait-until", "Open_vSwitch", ".", "dpdk_initialized=true")
        return inst
    except BaseException:
        inst.stop()
        raise
