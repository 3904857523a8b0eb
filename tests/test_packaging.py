"""Packaging pieces that need no chroot: versions in step, the man page generator."""

import importlib.machinery
import importlib.util
import re
import subprocess

import click

from pve_vhost_agent import __version__
from pve_vhost_agent.errors import ExitCode

from conftest import REPO
from pvestandin.layout import link_package


def load_click2man():
    loader = importlib.machinery.SourceFileLoader("click2man", str(REPO / "debian/click2man"))
    spec = importlib.util.spec_from_loader("click2man", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def render(page: str) -> subprocess.CompletedProcess:
    """The page through groff as man(1) would, with all warnings on: plain text, long lines."""
    return subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-rLL=300n", "-P-cbou"], input=page,
                          capture_output=True, text=True, timeout=60)


def test_package_version_is_the_cli_version():
    version = subprocess.run(["dpkg-parsechangelog", "-S", "Version"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.strip()
    assert version == __version__  # `pve-vhost-agent --version` must name the package


def sample_cli() -> click.Group:
    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--root", type=click.Path(), help="Folder taken as /.")
    def tool(root):
        """Do things to VMs.

        .dotted line and a \\backslash must stay text.

        \b
        kept  as
          written
        """

    @tool.group()
    def nic():
        """Manage NICs."""

    @nic.command("add")
    @click.argument("vmid", type=int)
    @click.option("--mtu", type=int, default=1500, show_default=True, help="Link MTU.")
    def nic_add(vmid, mtu):
        """Add a NIC.\f internal notes, not for users"""

    @tool.command(hidden=True)
    def secret():
        """Not for users."""

    return tool


def test_man_page_documents_nested_commands_and_renders_cleanly():
    click2man = load_click2man()
    page = click2man.manpage(sample_cli(), "tool", "1.2", "2026-01-02", ".SH SEE ALSO\nqm(1)\n")
    rendered = render(page)
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    text = rendered.stdout
    for expected in ("tool nic add [OPTIONS] VMID", "--mtu INTEGER", "Link MTU.  [default: 1500]",
                     "-h, --help", "Add a NIC.", "Manage NICs.", ".dotted line and a \\backslash",
                     "kept  as\n", "  written", "SEE ALSO", "tool 1.2", "2026-01-02"):
        assert expected in text, f"{expected!r} missing from\n{text}"
    assert "internal notes" not in text and "secret" not in text


def test_man_page_of_the_real_cli_renders_cleanly():
    result = subprocess.run(
        ["/usr/bin/python3", "debian/click2man", "--include", "debian/pve-vhost-agent.1.extra",
         "--version", __version__, "pve_vhost_agent.cli.main:main", "pve-vhost-agent"],
        cwd=REPO, env={"PYTHONPATH": str(REPO), "SOURCE_DATE_EPOCH": "86400", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=True)
    rendered = render(result.stdout)
    assert rendered.stderr == ""
    assert f"pve-vhost-agent {__version__}" in rendered.stdout and "1970-01-02" in rendered.stdout
    assert "qm set vmid --hookscript local:snippets/pve-vhost-agent" in rendered.stdout


def man_page() -> str:
    result = subprocess.run(
        ["/usr/bin/python3", "debian/click2man", "--include", "debian/pve-vhost-agent.1.extra",
         "--version", __version__, "pve_vhost_agent.cli.main:main", "pve-vhost-agent"],
        cwd=REPO, env={"PYTHONPATH": str(REPO), "SOURCE_DATE_EPOCH": "86400", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=True)
    return render(result.stdout).stdout


def test_man_page_has_what_an_operator_looks_up_beyond_help():
    page = man_page()
    sections = [line for line in page.splitlines() if line and not line.startswith(" ")]
    for section in ("EXIT STATUS", "ENVIRONMENT", "FILES", "HOOK PHASES", "JOURNAL FIELDS", "EXAMPLES"):
        assert section in sections, section
    exit_status = page.split("\nEXIT STATUS\n", 1)[1].split("\nENVIRONMENT\n", 1)[0]
    for code in ExitCode:  # every code the CLI and the hook use, documented
        assert re.search(rf"^ +{int(code)} +\S", exit_status, re.M), code
    for field in ("VMID", "PHASE", "NIC", "PORT", "BRIDGE", "ACTION", "RESULT", "DURATION_MS"):
        assert field in page.split("\nJOURNAL FIELDS\n", 1)[1]
    for text in ("/etc/pve/pve-vhost-agent/<vmid>.cfg", "vhostuser: vmid-netN", "/etc/default/pve-vhost-agent",
                 "PVE_VHOST_AGENT_INTERVAL", "pre-start", "post-stop", "content-dirs"):
        assert text in page, text


def test_the_readme_is_shipped():
    assert (REPO / "debian/pve-vhost-agent.docs").read_text().split() == ["README.md"]


def all_commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*path, name))


def test_help_summaries_are_whole_sentences_in_80_columns():
    for args in ([], ["nic"], ["qinq"], ["ovs"], ["link"]):
        shown = subprocess.run(["/usr/bin/python3", "-m", "pve_vhost_agent", *args, "--help"], cwd=REPO,
                               env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                               check=True).stdout
        commands = shown.split("\nCommands:\n", 1)[1]
        assert "..." not in commands and all(line.rstrip().endswith(".") for line in commands.splitlines()), shown


# Commands that change something (files, configs, Open vSwitch) and print what they did.
WRITERS = {("apply",), ("adopt",), ("enable",), ("disable",), ("install-hook",), ("migrate-spec",), ("nic", "add"),
           ("nic", "set"), ("nic", "remove"), ("qinq", "set"), ("qinq", "remove"), ("link", "add"), ("link", "remove")}


def test_every_command_that_writes_has_json():
    from pve_vhost_agent.cli.main import main
    found = {path for path, command in all_commands(main) if any(
        getattr(p, "name", "") == "dry_run" for p in command.params)}
    # what --dry-run marks as writing is in the list (the service's one-line status has `status --json`)
    assert found - {("service",)} <= WRITERS
    for path, command in all_commands(main):
        if path in WRITERS:
            assert any("--json" in p.opts for p in command.params), path


def test_hookscript_ignores_modules_beside_it_and_on_pythonpath(tmp_path):
    # Proxmox runs the hookscript from a snippets folder that holds other users' scripts,
    # as root: neither that folder nor PYTHONPATH may put modules into it.
    snippets, decoys, root = tmp_path / "snippets", tmp_path / "decoys", tmp_path / "root"
    for folder in (snippets, decoys / "pve_vhost_agent", snippets / "pve_vhost_agent"):
        folder.mkdir(parents=True)
    hook = snippets / "pve-vhost-agent"
    hook.write_bytes((REPO / "hookscripts/pve-vhost-agent").read_bytes())
    hook.chmod(0o755)
    for folder in (snippets, decoys):
        (folder / "sitecustomize.py").write_text("raise SystemExit('decoy sitecustomize imported')\n")
        (folder / "pve_vhost_agent" / "__init__.py").write_text("raise SystemExit('decoy package imported')\n")
    link_package(root)
    result = subprocess.run([str(hook), "100", "pre-start"], cwd=snippets, capture_output=True, text=True,
                            env={"PYTHONPATH": str(decoys), "PVE_VHOST_AGENT_ROOT": str(root), "LC_ALL": "C"},
                            timeout=60)
    assert "decoy" not in result.stdout + result.stderr
    # The real agent ran: VM 100 has no config under the root, so it is not the agent's VM.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
