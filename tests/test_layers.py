"""The layer rules of clipkit/ARCHITECTURE.md, enforced by reading every import under clipkit/.

The table in ARCHITECTURE.md is the single statement of the rules: this test parses it, so the
document and the check cannot drift apart. Every import statement counts, including lazy
imports inside functions and ``importlib.import_module("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "clipkit"
EXTERNAL = ("data_tools",)  # top-level packages of this repo that only some layers may import


@dataclass(frozen=True)
class Layer:
    name: str
    paths: tuple[str, ...]  # relative to clipkit/: a file ("config.py") or a folder ("data/")
    may_import: frozenset[str]


def read_rules(architecture_md: Path) -> list[Layer]:
    """The rows of the '| layer | paths | may import |' table under '## Layers'."""
    text = architecture_md.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("layer", "") or set(cells[0]) <= {"-"}:
            continue
        paths = tuple(re.findall(r"`([^`]+)`", cells[1]))
        allowed = frozenset(x.strip() for x in cells[2].split(",") if x.strip())
        layers.append(Layer(cells[0], paths, allowed))
    if not layers:
        raise AssertionError(f"{architecture_md}: no layer table under '## Layers'")
    return layers


def layer_of(rel: str, layers: list[Layer]) -> Layer | None:
    """The layer owning a path relative to clipkit/ (a folder rule matches everything below it)."""
    for layer in layers:
        for p in layer.paths:
            if rel == p or (p.endswith("/") and rel.startswith(p)):
                return layer
    return None


def module_path(module: str, root: Path) -> str | None:
    """'clipkit.models.load' -> 'models/load.py' (or 'models/' for a package), relative to root."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__.py"
    for n in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:n])
        if base.with_suffix(".py").is_file():
            return "/".join(parts[:n]) + ".py"
        if base.is_dir():
            return "/".join(parts[:n]) + "/"
    return "__init__.py"  # `clipkit.<attribute>`: a name the package's __init__ defines


def imported_modules(tree: ast.AST, here: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module; ``here`` is its dotted name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                pkg = here.split(".")[: -node.level]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base == "clipkit":  # `from clipkit import models`: the submodule (or an __init__ name)
                found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, base))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(root: Path, layers: list[Layer]) -> list[str]:
    """Every import under ``root`` (a clipkit/ folder) that the layer table does not allow."""
    bad = []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        src = layer_of(rel, layers)
        if src is None:
            bad.append(f"{rel}: in no layer of the table; add it to ARCHITECTURE.md")
            continue
        here = "clipkit." + rel[: -len(".py")].replace("/", ".")
        for line, mod in imported_modules(ast.parse(file.read_text(encoding="utf-8")), here):
            top = mod.split(".")[0]
            if top in EXTERNAL:
                target = top
            elif top == "clipkit":
                dst = layer_of(module_path(mod, root), layers)
                target = dst.name if dst else "no layer"
            else:
                continue  # third-party and standard library
            if target != src.name and target not in src.may_import:
                bad.append(f"{rel}:{line}: {src.name} imports {mod} ({target})")
    return bad


RULES = read_rules(PKG / "ARCHITECTURE.md")


def test_the_table_names_the_layers_the_issue_requires():
    names = {layer.name for layer in RULES}
    assert {"base", "data", "models", "losses", "evaluation", "index", "training", "cli"} <= names
    by = {layer.name: layer for layer in RULES}
    for low in ("losses", "models", "data", "evaluation", "index"):
        assert not {"training", "cli", "data_tools"} & by[low].may_import, low
    assert not {"models", "evaluation"} & by["data"].may_import
    assert [layer.name for layer in RULES if "data_tools" in layer.may_import] == ["cli"]


def test_every_module_is_in_a_layer_and_imports_only_what_its_layer_may():
    assert violations(PKG, RULES) == []


# A planted violation must be caught: copy the package, add one bad import of each kind, check.
PLANTS = [
    (
        "evaluation/zz_plant.py",
        "from clipkit.training.loop import train\n",
        "evaluation imports clipkit.training",
    ),
    ("models/zz_plant.py", "def f():\n    import clipkit.cli.main\n", "models imports clipkit.cli.main"),
    ("data/zz_plant.py", "from clipkit.models import build_model\n", "data imports clipkit.models"),
    ("data/zz_plant.py", "from clipkit import evaluation\n", "data imports clipkit.evaluation"),
    ("models/zz_plant.py", "from clipkit import __version__\n", "models imports clipkit.__version__ (api)"),
    ("index/zz_plant.py", "from ..evaluation import embed\n", "index imports clipkit.evaluation"),
    (
        "losses/zz_plant.py",
        "import importlib\nimportlib.import_module('data_tools.build_emoji')\n",
        "data_tools",
    ),
    ("training/zz_plant.py", "import data_tools\n", "training imports data_tools"),
]


@pytest.mark.parametrize("rel,code,expect", PLANTS, ids=[p[0] + ":" + p[2] for p in PLANTS])
def test_a_planted_violation_is_reported(tmp_path, rel, code, expect):
    root = tmp_path / "clipkit"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(root, RULES) == []  # the copy is clean
    (root / rel).write_text(code)
    found = violations(root, RULES)
    assert len(found) == 1 and found[0].startswith(rel) and expect in found[0], found


def test_a_module_outside_every_layer_is_reported(tmp_path):
    root = tmp_path / "clipkit"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "stray.py").write_text("x = 1\n")
    assert violations(root, RULES) == ["stray.py: in no layer of the table; add it to ARCHITECTURE.md"]


def test_allowed_imports_pass(tmp_path):
    root = tmp_path / "clipkit"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "cli" / "zz_ok.py").write_text("import data_tools\nfrom clipkit.training import loop\n")
    (root / "training" / "zz_ok.py").write_text("from clipkit.evaluation import metrics\n")
    (root / "models" / "zz_ok.py").write_text("from clipkit.data import atomic\nfrom . import towers\n")
    assert violations(root, RULES) == []
