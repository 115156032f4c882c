"""Every third-party module that the library and the CLI import is a declared dependency
of clipkit (CLIP_benchmark 1.6.2 imports ``requests`` without declaring it)."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is in the test extra for it
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CHECKED = [ROOT / "clipkit"] + sorted(
    p for p in (ROOT / "clipkit").iterdir() if (p / "__init__.py").is_file()
)
LOCAL = ("clipkit", "data_tools", "__future__")  # this repository's own packages


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(folder: Path) -> dict[str, str]:
    """{top-level module: first file importing it} of the .py files in ``folder``."""
    found: dict[str, str] = {}
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path.name)
    return found


def undeclared(folders: list[Path]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # hard dependencies, and the optional extras a user installs by name (clipkit[tracking]);
    # the test extra is not something the library may import
    extras = [d for name, deps in project["optional-dependencies"].items() if name != "test" for d in deps]
    declared = {_norm(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in project["dependencies"] + extras}
    dists = packages_distributions()
    out = []
    for folder in folders:
        for module, where in imported_modules(folder).items():
            if module in sys.stdlib_module_names or module in LOCAL:
                continue
            owners = {_norm(d) for d in dists.get(module, [])}
            if not owners & declared:
                out.append(f"{module} ({where}; from {sorted(owners) or 'nothing installed'})")
    return out


def test_every_import_is_declared():
    assert undeclared(CHECKED) == []


def test_the_check_sees_imports(tmp_path):
    # the model libraries are imported where models are loaded (models/), the rest by evaluation
    mods = {
        **imported_modules(ROOT / "clipkit" / "models"),
        **imported_modules(ROOT / "clipkit" / "evaluation"),
    }
    for expected in (
        "torch",
        "numpy",
        "faiss",
        "open_clip",
        "transformers",
        "sklearn",
        "pandas",
        "matplotlib",
    ):
        assert expected in mods, expected
    (tmp_path / "m.py").write_text("import requests\nfrom torch import nn\n")
    assert [u.split()[0] for u in undeclared([tmp_path])] == ["requests"]
