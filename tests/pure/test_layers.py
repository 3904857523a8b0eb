"""The package's folders are its layers, and each layer imports only the ones below it.

The rule is read from the folders themselves (every module found is checked), so a new
module is covered the day it is added. The pure layers (model, formats, plan) import no
I/O library, which is also checked in a clean interpreter, so that another test's imports
cannot hide a module that pulls one in indirectly.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pve_vhost_agent"
TOP_LEVEL = {"errors", "settings", "__init__", "__main__"}
# What each folder may import from the package (its own folder included).
ALLOWED = {
    "model": {"errors", "model"},
    "formats": {"errors", "model", "formats"},
    "plan": {"errors", "model", "formats", "plan"},
    "adapters": {"errors", "settings", "model", "formats", "adapters"},
    "flows": {"errors", "settings", "model", "formats", "plan", "adapters", "flows"},
    "cli": {"", "errors", "settings", "model", "formats", "flows", "cli"},  # click and formatting only
}
PURE = ("model", "formats", "plan")
# Libraries that touch the world: never imported by a pure layer.
IO_LIBRARIES = {"os", "sys", "io", "subprocess", "fcntl", "socket", "select", "signal", "shutil", "tempfile",
                "time", "threading", "logging", "ovs", "pyroute2", "systemd", "click"}


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; write it absolute")
            names = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "pve_vhost_agent" \
                else [node.module]
            found += [(node.lineno, name) for name in names]
    return found


def layer_of(dotted: str) -> str | None:
    """`pve_vhost_agent.plan.ovs` -> plan; a top-level module -> its name; '' for the package."""
    parts = dotted.split(".")
    if parts[0] != "pve_vhost_agent":
        return None
    if len(parts) == 1 or parts[1] == "__version__":
        return ""
    return parts[1]


def test_the_top_level_holds_only_the_shared_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= TOP_LEVEL, f"move {sorted(top - TOP_LEVEL)} into a layer folder"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ALLOWED)


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(folder):
    wrong = []
    for path in modules(folder):
        for line, name in imports(path):
            layer = layer_of(name)
            if layer is not None and layer not in ALLOWED[folder]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not wrong, f"{folder}/ may import only {sorted(ALLOWED[folder])}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("folder", PURE)
def test_pure_layers_import_no_io_library(folder):
    wrong = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
             for path in modules(folder) for line, name in imports(path)
             if name.split(".")[0] in IO_LIBRARIES]
    assert not wrong, "pure code must not touch the world:\n" + "\n".join(wrong)


def test_pure_layers_load_no_io_library_even_indirectly():
    names = [".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for f in PURE for p in modules(f)]
    names = [n.removesuffix(".__init__") for n in names]
    code = (
        f"import json, sys; sys.path.insert(0, {str(PACKAGE.parent)!r})\n"
        "before = set(sys.modules)\n"
        f"for name in {names!r}:\n"
        "    __import__(name)\n"
        "print(json.dumps(sorted(m for m in set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    loaded = {m.split(".")[0] for m in json.loads(out)}
    assert not loaded & (IO_LIBRARIES - {"os", "sys", "io"}), sorted(loaded & IO_LIBRARIES)
