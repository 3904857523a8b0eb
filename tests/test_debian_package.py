"""`apt install pve-vhost-agent` on clean Debian 12 (Proxmox VE 8) and Debian 13 (VE 9).

The .deb is built from a copy of the checkout and installed with apt in a fresh
debootstrap chroot of each suite, so apt resolves the dependencies from the archive.
Between tests each chroot is in the default state: package installed once, the
snippets folder present, a sample VM config that uses the hookscript.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import socket
import subprocess

import pytest

from conftest import REPO
from fixtures.debian_chroot import (
    Chroot, copy_checkout, debian_mirror, fresh_chroot, remove_chroot)

pytestmark = pytest.mark.slow

SUITES = ["bookworm", "trixie"]
PACKAGE = "pve-vhost-agent"
SHIPPED = "/usr/share/pve-vhost-agent/pve-vhost-agent"
SNIPPETS = "/var/lib/vz/snippets"
SNIPPET = f"{SNIPPETS}/pve-vhost-agent"
SPEC_FILE = "/etc/pve/pve-vhost-agent.cfg"
DEPENDENCIES = ["python3", "python3-openvswitch", "python3-pyroute2", "python3-click",
                "python3-systemd"]
PHASES = ["pre-start", "post-start", "pre-stop", "post-stop"]
SAMPLE_VMID = "100"
# The hookscript runs on the host whose short name is the node name: the chroot shares it.
NODE = socket.gethostname().split(".", 1)[0]
SAMPLE_VM_CONF = f"/etc/pve/nodes/{NODE}/qemu-server/{SAMPLE_VMID}.conf"
SAMPLE_VM = """\
boot: order=scsi0;net0
cores: 2
hookscript: local:snippets/pve-vhost-agent
memory: 2048
name: sample
net0: virtio=BC:24:11:5A:00:01,bridge=vmbr0
ostype: l26
scsi0: local-lvm:vm-100-disk-0,size=8G
scsihw: virtio-scsi-single
"""


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=SUITES)
def chroot(request, package_builds):
    """A fresh chroot of the suite with the package installed by apt from ./x.deb."""
    env = fresh_chroot(request.param, debian_mirror())
    try:
        write_sample_host(env)
        env.install_debs(package_builds["base"].deb)
        yield env
    finally:
        remove_chroot(env)


@pytest.fixture
def lifecycle(chroot, package_builds):
    """For tests that upgrade, remove or purge: the default state is restored after."""
    yield chroot
    reset(chroot, package_builds["base"].deb)


def write_sample_host(env: Chroot, snippets: bool = True) -> None:
    if snippets:
        env.path(SNIPPETS).mkdir(parents=True, exist_ok=True)
    conf = env.path(SAMPLE_VM_CONF)
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(SAMPLE_VM)
    link = env.path("/etc/pve/qemu-server")
    if not link.is_symlink():
        link.symlink_to(f"nodes/{NODE}/qemu-server")
    env.path("/etc/pve/.version").write_text('{\n"starttime": 0\n}\n')  # pmxcfs serves /etc/pve


def reset(env: Chroot, deb, snippets: bool = True) -> None:
    """Purge, put back the sample host, install `deb` again."""
    env.run("dpkg", "--purge", PACKAGE)  # also when a test left it removed or purged
    env.run("rm", "-rf", SNIPPET, SPEC_FILE, "/var/lib/vz")
    write_sample_host(env, snippets)
    env.install_debs(deb)


def cli_commands(env: Chroot) -> set[str]:
    """Command names listed by the installed `pve-vhost-agent --help`."""
    help_text = env.run(PACKAGE, "--help").stdout
    section = help_text.split("\nCommands:\n", 1)[1] if "\nCommands:\n" in help_text else ""
    return {line.split()[0] for line in section.splitlines() if line.startswith("  ")}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(env: Chroot, folder: str) -> dict[str, str]:
    """Every entry under `folder`: file contents by hash, links by target."""
    digest = {}
    for path in sorted(env.path(folder).rglob("*")):
        name = str(path.relative_to(env.root))
        digest[name] = (f"-> {path.readlink()}" if path.is_symlink()
                        else sha256(path) if path.is_file() else "dir")
    return digest


# ---------------------------------------------------------------- installed state

def test_apt_resolves_the_dependencies_from_the_archive(chroot):
    for package in [PACKAGE, *DEPENDENCIES]:
        assert chroot.package_status(package) == "ii", f"{package} is not installed"
    # Open vSwitch itself is only recommended: --no-install-recommends leaves it out.
    assert chroot.package_status("openvswitch-switch") != "ii"


def test_version_is_the_package_version(chroot, package_builds):
    result = chroot.run(PACKAGE, "--version")
    assert result.stdout.strip() == f"pve-vhost-agent, version {package_builds['base'].version}"


def test_every_module_imports_under_the_suite_python(chroot):
    script = (
        "import importlib, importlib.metadata, pkgutil, sys\n"
        "import ovs.db.idl, ovs.version, pyroute2, click, systemd.journal, pve_vhost_agent\n"
        "assert pve_vhost_agent.__file__.startswith('/usr/lib/python3/dist-packages/')\n"
        "for module in pkgutil.walk_packages(pve_vhost_agent.__path__, 'pve_vhost_agent.'):\n"
        "    importlib.import_module(module.name)\n"
        "print(f'{sys.version_info[0]}.{sys.version_info[1]}',\n"
        "      importlib.metadata.version('pyroute2'), ovs.version.VERSION)\n")
    versions = chroot.run("/usr/bin/python3", "-c", script).stdout.split()
    # What each suite ships: Python, python3-pyroute2, python3-openvswitch.
    expected = {"bookworm": ["3.11", "0.7.2", "3.1"], "trixie": ["3.13", "0.7.7", "3.5"]}
    assert [versions[0], versions[1], versions[2].rsplit(".", 1)[0]] == expected[chroot.suite]


def test_hookscript_is_shipped_and_copied_to_the_snippets_folder(chroot):
    shipped, snippet = chroot.path(SHIPPED), chroot.path(SNIPPET)
    # Isolated and without site (README, "The hookscript"), as written: Debian 13's
    # dh_python3 would rewrite the line to a bare `#! /usr/bin/python3` (debian/rules).
    assert shipped.read_text().startswith("#!/usr/bin/python3 -IS\n")
    assert shipped.stat().st_mode & 0o777 == 0o755
    assert snippet.read_bytes() == shipped.read_bytes()
    assert snippet.stat().st_mode & 0o777 == 0o755


def test_the_shipped_hookscript_ignores_python_variables_and_its_own_folder(chroot):
    # A pve_vhost_agent of someone else's, where PYTHONPATH points and beside the snippet
    # (a folder of a storage others may fill): the hook must load the package's own.
    for folder in ("/tmp/h4shadow", SNIPPETS):
        chroot.path(f"{folder}/pve_vhost_agent").mkdir(parents=True, exist_ok=True)
        chroot.path(f"{folder}/pve_vhost_agent/__init__.py").write_text("print('shadowed')\n")
    try:
        result = chroot.run(SNIPPET, "100", "pre-start", env={"PYTHONPATH": "/tmp/h4shadow"}, check=False)
        assert "shadowed" not in result.stdout + result.stderr
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result  # no VM 100: silent
    finally:
        for folder in ("/tmp/h4shadow", SNIPPETS):
            shutil.rmtree(chroot.path(f"{folder}/pve_vhost_agent"))


def test_man_page_documents_every_command(chroot):
    page = gzip.decompress(chroot.path("/usr/share/man/man1/pve-vhost-agent.1.gz").read_bytes())
    text = page.decode().replace("\\-", "-")
    assert text.startswith('.TH "PVE-VHOST-AGENT" 1')
    for option in ("--version", "--root", "--ovsdb", "--node"):
        assert option in text
    for command in cli_commands(chroot):
        assert f'.SS "pve-vhost-agent {command}' in text, f"{command} is not in the man page"
    for section in ("EXIT STATUS", "ENVIRONMENT", "FILES", "HOOK PHASES", "JOURNAL FIELDS", "EXAMPLES"):
        assert f".SH {section}" in text, section


def test_the_readme_and_the_service_settings_are_installed(chroot):
    readme = gzip.decompress(chroot.path("/usr/share/doc/pve-vhost-agent/README.md.gz").read_bytes()).decode()
    assert readme.startswith("# pve-vhost-agent")
    settings = chroot.path("/etc/default/pve-vhost-agent").read_text()
    assert "#PVE_VHOST_AGENT_INTERVAL=10" in settings
    assert "/etc/default/pve-vhost-agent" in chroot.run("dpkg-query", "-W", "-f=${Conffiles}", PACKAGE).stdout


def test_bash_completion_completes_options_and_commands(chroot):
    def complete(*words: str) -> set[str]:
        script = ("source /usr/share/bash-completion/completions/pve-vhost-agent\n"
                  'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))\n'
                  "_pve_vhost_agent_completion pve-vhost-agent\n"
                  'printf "%s\\n" "${COMPREPLY[@]}"\n')
        result = chroot.run("bash", "-c", script, "bash", *words)
        return set(result.stdout.split())

    assert complete(PACKAGE, "--vers") == {"--version"}
    assert complete(PACKAGE, "") == cli_commands(chroot)


# ---------------------------------------------------------------- upgrade, remove, purge

def test_upgrade_refreshes_the_snippet_it_wrote(lifecycle, package_builds):
    upgrade, base = package_builds["upgrade"], package_builds["base"]
    lifecycle.install_debs(upgrade.deb)
    assert lifecycle.path(SNIPPET).read_text().endswith("# changed by the upgrade test\n")
    assert lifecycle.path(SNIPPET).read_bytes() == lifecycle.path(SHIPPED).read_bytes()
    lifecycle.install_debs(base.deb)  # a downgrade refreshes it the same way
    assert lifecycle.path(SNIPPET).read_bytes() == lifecycle.path(SHIPPED).read_bytes()
    assert "# changed by the upgrade test" not in lifecycle.path(SNIPPET).read_text()


def test_upgrade_keeps_a_locally_changed_snippet_and_warns(lifecycle, package_builds):
    snippet = lifecycle.path(SNIPPET)
    local = snippet.read_text() + "# local change\n"
    snippet.write_text(local)
    result = lifecycle.install_debs(package_builds["upgrade"].deb)
    assert snippet.read_text() == local
    assert f"{SNIPPET} differs from the shipped hookscript" in result.stdout + result.stderr


def test_purge_removes_the_unchanged_snippet_and_nothing_of_the_admin(lifecycle):
    lifecycle.path(SPEC_FILE).write_text("# sample spec: removing the package must keep it\n")
    before = tree_digest(lifecycle, "/etc/pve")
    lifecycle.apt_get("purge", PACKAGE)
    assert not lifecycle.path(SNIPPET).exists()
    assert not lifecycle.path("/var/lib/pve-vhost-agent").exists()
    assert lifecycle.path(SNIPPETS).is_dir()
    assert tree_digest(lifecycle, "/etc/pve") == before


def test_purge_leaves_a_locally_changed_snippet(lifecycle):
    snippet = lifecycle.path(SNIPPET)
    local = snippet.read_text() + "# local change\n"
    snippet.write_text(local)
    result = lifecycle.apt_get("purge", PACKAGE)
    assert snippet.read_text() == local
    assert f"{SNIPPET} was changed locally, left in place" in result.stdout + result.stderr


def test_remove_keeps_the_snippet_which_then_asks_for_a_reinstall(lifecycle):
    before = tree_digest(lifecycle, "/etc/pve")
    result = lifecycle.apt_get("remove", PACKAGE)
    assert SAMPLE_VM_CONF in result.stdout + result.stderr  # the VMs that use the hookscript
    assert tree_digest(lifecycle, "/etc/pve") == before
    hook = lifecycle.run(SNIPPET, SAMPLE_VMID, "pre-start", env={"LC_ALL": "C"}, check=False)
    assert hook.returncode == 1  # pre-start aborts: no agent, no ports
    assert hook.stdout == ""
    assert len(hook.stderr.splitlines()) == 1 and "apt install pve-vhost-agent" in hook.stderr


def test_a_snippets_folder_that_refuses_the_copy_does_not_fail_the_install(lifecycle,
                                                                            package_builds):
    lifecycle.run("rm", SNIPPET)
    snippets = str(lifecycle.path(SNIPPETS))
    subprocess.run(["chattr", "+i", snippets], check=True)  # even root cannot add files
    try:
        result = lifecycle.install_debs(package_builds["upgrade"].deb)
    finally:
        subprocess.run(["chattr", "-i", snippets], check=True)
    assert lifecycle.package_status(PACKAGE) == "ii"
    assert f"could not copy the hookscript into {SNIPPETS}" in result.stdout + result.stderr
    assert list(lifecycle.path(SNIPPETS).iterdir()) == []


def test_install_off_proxmox_copies_nothing(lifecycle, package_builds):
    reset(lifecycle, package_builds["base"].deb, snippets=False)
    assert lifecycle.path(SHIPPED).is_file()
    assert not lifecycle.path("/var/lib/vz").exists()


def test_install_on_a_node_without_snippets_folder_makes_it(lifecycle, package_builds):
    # A default Proxmox install has /var/lib/vz but no snippets/ until snippets content is
    # enabled; every node needs the hookscript (migration targets run pre-start).
    lifecycle.run("dpkg", "--purge", PACKAGE)
    lifecycle.run("rm", "-rf", SNIPPETS)
    lifecycle.install_debs(package_builds["base"].deb)
    assert lifecycle.path(SNIPPET).read_bytes() == lifecycle.path(SHIPPED).read_bytes()


def test_a_unit_in_systemd_folder_is_installed_and_enabled(lifecycle, package_builds):
    lifecycle.install_debs(package_builds["with_unit"].deb)  # no systemd runs in the chroot
    units = [lifecycle.path(f"{prefix}/lib/systemd/system/pve-vhost-agent.service")
             for prefix in ("", "/usr")]
    assert any(unit.is_file() for unit in units)
    wants = lifecycle.path("/etc/systemd/system/multi-user.target.wants/pve-vhost-agent.service")
    assert wants.is_symlink()


# ---------------------------------------------------------------- the CLI on a sample host

def test_show_on_a_sample_vm_without_spec(chroot):
    result = chroot.run(PACKAGE, "show", SAMPLE_VMID, "--json")
    assert json.loads(result.stdout)["args"] == []  # no spec: the agent owns no args


def test_hookscript_for_a_vm_without_spec_is_silent(chroot):
    for phase in PHASES:  # as Proxmox runs it: argv, LC_ALL=C, stdin an empty pipe
        result = chroot.run(SNIPPET, SAMPLE_VMID, phase, env={"LC_ALL": "C"}, check=False)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), phase


# ---------------------------------------------------------------- lintian

def test_lintian_finds_no_error_or_warning(package_builds, tmp_path):
    copy_checkout(tmp_path / "src")
    subprocess.run(["dpkg-source", "--build", "src"], cwd=tmp_path, check=True,
                   capture_output=True)
    dsc = next(tmp_path.glob("pve-vhost-agent_*.dsc"))
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--display-level", ">=info",
         str(package_builds["base"].changes), str(dsc)],
        capture_output=True, text=True, timeout=600)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWI]: ", line)]
    assert result.returncode == 0 and not [t for t in tags if t[0] in "EW"], "\n".join(tags)
    # Explained in debian/lintian-overrides.bookworm: Proxmox VE boots with systemd only.
    assert not [t for t in tags if "init.d-script" in t], "\n".join(tags)
    control = subprocess.run(["dpkg-deb", "-f", str(package_builds["base"].deb), "Maintainer"],
                             capture_output=True, text=True, check=True).stdout
    assert "example.org" not in control and "maintainers@pve-vhost-agent.invalid" in control


# ---------------------------------------------------------------- tests at build time and autopkgtest

def test_the_pure_tests_run_at_build_time_unless_nocheck(package_builds):
    assert re.search(r"\d+ passed, .*deselected", package_builds["base"].log), package_builds["base"].log[-3000:]
    assert not re.search(r"\d+ passed", package_builds["upgrade"].log)  # built with DEB_BUILD_OPTIONS=nocheck


def test_autopkgtest_passes_against_the_installed_package(chroot, tmp_path):
    """debian/tests/control as autopkgtest runs it: from the source tree, the package installed."""
    control = (REPO / "debian/tests/control").read_text()
    assert re.findall(r"^Tests: (\S+)", control, re.M) == ["command", "pure"]
    chroot.apt_get("install", "python3-pytest", "python3-hypothesis")
    source = copy_checkout(chroot.path("/tmp/adt-src"))
    try:
        for test in ("command", "pure"):
            chroot.run("mkdir", "-p", f"/tmp/adt-{test}")
            result = chroot.run("sh", f"debian/tests/{test}", cwd="/tmp/adt-src", env={"AUTOPKGTEST_TMP": f"/tmp/adt-{test}"})
            assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"\d+ passed", result.stdout), result.stdout
    finally:
        chroot.run("rm", "-rf", "/tmp/adt-src", "/tmp/adt-command", "/tmp/adt-pure")
        chroot.apt_get("purge", "--autoremove", "python3-pytest", "python3-hypothesis")
        assert not source.exists()


# ---------------------------------------------------------------- relations and the snippets folder

def test_recommends_bring_the_ring_mempool_driver_of_the_suites_dpdk(lifecycle, package_builds):
    """One arch:all package for both releases: apt takes the alternative the suite has."""
    ring = {"bookworm": "librte-mempool-ring23", "trixie": "librte-mempool-ring25"}[lifecycle.suite]
    lifecycle.run("dpkg", "--purge", PACKAGE)
    deb = package_builds["base"].deb
    shutil.copy(deb, lifecycle.path("/tmp") / deb.name)
    plan = lifecycle.run("apt-get", "-s", "-o", "APT::Install-Recommends=true", "install", f"./{deb.name}",
                         cwd="/tmp").stdout
    installs = set(re.findall(r"^Inst (\S+)", plan, re.M))
    assert {ring, "openvswitch-switch-dpdk", PACKAGE} <= installs, plan


def test_the_snippet_goes_where_the_local_storages_content_dirs_say(lifecycle, package_builds):
    storage = lifecycle.path("/etc/pve/storage.cfg")
    storage.write_text("dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,snippets\n"
                       "\tcontent-dirs snippets=hooks/pve\n")
    try:
        lifecycle.run("dpkg", "--purge", PACKAGE)
        lifecycle.install_debs(package_builds["base"].deb)
        moved = lifecycle.path("/var/lib/vz/hooks/pve/pve-vhost-agent")
        assert moved.read_bytes() == lifecycle.path(SHIPPED).read_bytes()
        shown = json.loads(lifecycle.run(PACKAGE, "install-hook", "--dry-run", "--json").stdout)
        assert (shown["folder"], shown["changed"]) == ("/var/lib/vz/hooks/pve", False)
        lifecycle.run("dpkg", "--purge", PACKAGE)
        assert not moved.exists()
    finally:
        storage.unlink()
