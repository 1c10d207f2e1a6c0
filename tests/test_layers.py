"""The package's shape: layers import only downwards, and what `import balloonlab` pulls in.

These tests read the source (ast), so they fail on the import itself, lazy or not, before it
ever runs: a lower layer that imports a higher one, the QEMU backend importing the libvirt
one, or anyone reaching into another package's private names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "balloonlab"

#: What each layer may import from balloonlab, lowest first (README "Where things live").
#: The backends sit side by side over model/; libvirt's QMP passthrough reuses the QEMU
#: backend's public QMP pieces (discovery, the QMP balloon), never the other way round.
ALLOWED: dict[str, set[str]] = {
    "model": set(),
    "domain": {"model"},
    "image": {"model", "domain"},
    "qemu": {"model", "domain", "image"},
    "libvirt": {"model", "domain", "image", "qemu"},
    "record": {"model"},
    "analysis": {"model"},
    "policies": {"model"},  # pure: a policy sees frames through model.policy's view, nothing else
    "experiments": {"model", "domain", "image", "qemu", "record", "analysis", "policies"},  # image: the built-in guest
    "blocking": {"model", "domain", "qemu", "libvirt", "record", "experiments"},
    "widgets": {"model", "domain", "image", "qemu", "record", "experiments", "analysis", "blocking"},
    "cli": {"model", "domain", "image", "qemu", "record", "experiments", "analysis", "blocking", "policies"},
}
TOP_LEVEL = {"__init__", "_version"}


def layer_of(module: str) -> str:
    """``balloonlab.qemu.guest`` -> ``qemu``; ``balloonlab.cli`` -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) for every balloonlab import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "balloonlab" or node.module.startswith("balloonlab."):
                found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "." * node.level + (node.module or ""), []))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("balloonlab")]
    return sorted(found)


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out.append((".".join(rel.parts).removesuffix(".__init__"), path))
    return out


def test_every_layer_in_the_tree_is_known():
    layers = {layer_of(name) for name, _ in modules()} - TOP_LEVEL
    assert layers == set(ALLOWED), "a new sub-package needs its place in ALLOWED and the README"


def violations(name: str, path: Path) -> list[str]:
    """What is wrong with the imports of module ``name`` (its source at ``path``)."""
    mine = layer_of(name)
    wrong = []
    for line, module, names in imports_of(path):
        if module.startswith("."):
            wrong.append(f"{path.name}:{line}: relative import {module!r} (write balloonlab.<layer>...)")
            continue
        theirs = layer_of(module)
        if theirs in TOP_LEVEL and mine not in TOP_LEVEL and module == "balloonlab":
            wrong.append(f"{path.name}:{line}: imports the flat API (balloonlab) from inside a layer")
        elif theirs not in TOP_LEVEL and theirs != mine and mine not in TOP_LEVEL and theirs not in ALLOWED[mine]:
            wrong.append(f"{path.name}:{line}: layer {mine!r} imports {module} (layer {theirs!r})")
        if theirs != mine and mine not in TOP_LEVEL:
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            private += [p for p in module.split(".")[2:] if p.startswith("_")]
            if private:
                wrong.append(f"{path.name}:{line}: reaches into {module}'s private {private}")
    return wrong


@pytest.mark.parametrize("name, path", modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_go_only_downwards(name, path):
    wrong = violations(name, path)
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_upward_sideways_private_and_relative_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from balloonlab.qemu.guest import Guest\n"
                   "def f():\n    from balloonlab.analysis.plotting import plot_memory\n"
                   "from balloonlab.model.stats import _private\n"
                   "from .buffer import x\n")
    wrong = violations("balloonlab.record.bad", bad)
    assert [w.split(": ", 1)[1] for w in wrong] == [
        "layer 'record' imports balloonlab.qemu.guest (layer 'qemu')",
        "layer 'record' imports balloonlab.analysis.plotting (layer 'analysis')",
        "reaches into balloonlab.model.stats's private ['_private']",
        "relative import '.buffer' (write balloonlab.<layer>...)",
    ]
    bad.write_text("from balloonlab.libvirt.link import DomainLink\n")
    assert violations("balloonlab.qemu.bad", bad)  # the QEMU backend never imports libvirt's


def test_import_balloonlab_loads_no_widget_libvirt_or_plotting_code():
    code = ("import sys, balloonlab; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ipywidgets', 'libvirt', 'libvirt_qemu', 'ipympl', 'matplotlib') or m.startswith(('balloonlab.widgets', "
            "'balloonlab.libvirt', 'balloonlab.blocking.libvirt', 'balloonlab.analysis.plotting'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_names_resolve():
    import balloonlab as bl
    from balloonlab.blocking.libvirt import SyncLibvirtGuest
    from balloonlab.libvirt import LibvirtGuest
    assert bl.LibvirtGuest is LibvirtGuest and bl.SyncLibvirtGuest is SyncLibvirtGuest
    assert callable(bl.dashboard)
    assert callable(bl.plot_memory)
    assert set(bl.__all__) <= set(dir(bl)) | {"dashboard", "LibvirtGuest", "SyncLibvirtGuest", "plot_memory"}


@pytest.mark.parametrize("name, path", [m for m in modules() if m[1].name == "__init__.py"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_package_says_its_role(name, path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc is not None and len(doc.split()) >= 25, f"{name} needs a one-paragraph docstring"


def test_no_module_is_two_jobs():
    long = {name: n for name, path in modules() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
