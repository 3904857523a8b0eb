"""Packaging pieces that need no chroot: versions in step, the man page generator."""

import importlib.machinery
import importlib.util
import subprocess

import click

from pve_vhost_agent import __version__

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
