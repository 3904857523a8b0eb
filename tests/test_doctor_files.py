"""What the doctor reads from files under --root (adapters/hostnet.py): /etc/network/interfaces
with its `source` and `source-directory` lines resolved as ifupdown2 resolves them, sysctls
from /proc/sys, and host facts (dpkg's status file, the ovs-vswitchd alternative)."""

import os

from pve_vhost_agent.adapters.hostnet import read_host_facts, read_network_file, read_sysctls
from pve_vhost_agent.settings import Settings


def write(root, path, text):
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def test_sources_are_read_depth_first_with_globs_and_folders(tmp_path):
    write(tmp_path, "/etc/network/interfaces", "auto lo\niface lo inet loopback\n"
                                               "source /etc/network/interfaces.d/*\n"
                                               "source-directory interfaces.extra\n"
                                               "source /etc/network/missing.cfg\n")
    write(tmp_path, "/etc/network/interfaces.d/b", "auto vmbr1\niface vmbr1 inet manual\n\tbridge-ports none\n")
    write(tmp_path, "/etc/network/interfaces.d/a", "auto bond0\niface bond0 inet manual\n\tbond-slaves eno1\n"
                                                   "source /etc/network/interfaces\n")  # a loop
    write(tmp_path, "/etc/network/interfaces.extra/vlans", "auto bond0.5\niface bond0.5 inet manual\n")
    write(tmp_path, "/etc/network/interfaces.extra/skip.cfg", "auto nope\niface nope inet manual\n")  # a dot: skipped
    nf = read_network_file(Settings(root=tmp_path, node="pve1"))
    assert nf.files == ("/etc/network/interfaces", "/etc/network/interfaces.d/a", "/etc/network/interfaces.d/b",
                        "/etc/network/interfaces.extra/vlans")
    assert [s.name for s in nf.stanzas] == ["lo", "bond0", "vmbr1", "bond0.5"]
    assert nf.problems == (
        "/etc/network/interfaces.d/a:4: /etc/network/interfaces is sourced again (a loop?); read once",
        "/etc/network/interfaces:5: source /etc/network/missing.cfg: not found")


def test_no_interfaces_file_is_none(tmp_path):
    assert read_network_file(Settings(root=tmp_path, node="pve1")) is None


def test_sysctls_and_host_facts_come_from_under_the_root(tmp_path):
    write(tmp_path, "/proc/sys/net/ipv4/ip_forward", "0\n")
    write(tmp_path, "/proc/meminfo", "MemTotal:       16384000 kB\nMemAvailable:    8192000 kB\n")
    write(tmp_path, "/proc/cpuinfo", "processor\t: 0\n\nprocessor\t: 1\n")
    write(tmp_path, "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "12\n")
    write(tmp_path, "/var/lib/dpkg/status", "Package: librte-mempool-ring23\nStatus: install ok installed\n")
    (tmp_path / "etc/alternatives").mkdir(parents=True)
    os.symlink("/usr/lib/openvswitch-switch/ovs-vswitchd", tmp_path / "etc/alternatives/ovs-vswitchd")
    settings = Settings(root=tmp_path, node="pve1")
    assert read_sysctls(settings) == {"net.ipv4.ip_forward": "0"}
    facts = read_host_facts(settings)
    assert (facts.cpus, facts.mem_total_kib, facts.memory.available_kib, dict(facts.memory.hugepages_free)) == \
        (2, 16384000, 8192000, {2048: 12})
    assert facts.packages == {"librte-mempool-ring23"} and facts.packages_known
    assert facts.vswitchd_alternative == "/usr/lib/openvswitch-switch/ovs-vswitchd"
