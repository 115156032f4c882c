"""No config key without a reader: every leaf of ``clipkit.config.Config`` is read in ``clipkit/``
outside ``config.py``, so a key cannot again be accepted and silently ignored.

A read of leaf ``<section>.<key>`` (e.g. ``train.keep_best``) is an attribute access ``X.keep_best``
(or ``getattr(X, "keep_best")``, also with the name from a loop over string constants) where
``X`` is known to be that section:

- ``<...>.train`` (an attribute named like the section, e.g. ``cfg.train``, ``run.cfg.train``);
- a name bound to such an expression (``t = cfg.train``, ``t, o = cfg.train, cfg.optim``);
- a parameter or variable annotated with the section's class (``cfg: TrainConfig``); a class
  used for several sections (``TowerConfig``: ``model.vision`` and ``model.text``) counts for each.

Names are bound per function (plus the enclosing scopes' bindings), so a read counts only where
a section-typed value is in hand. ``test_an_unread_key_is_caught`` plants a key and an
unread one of a common name to show the check fails on them.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path

import clipkit.config as config_module
from clipkit.config import Config

PACKAGE = Path(config_module.__file__).resolve().parent


def sections(cls: type = Config, path: str = "") -> dict[str, type]:
    """Section path -> dataclass (the root is "")."""
    out = {path: cls}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(sections(hints[f.name], f"{path}.{f.name}".lstrip(".")))
    return out


def leaves(cls: type = Config) -> list[tuple[str, str]]:
    """(section path, key) of every non-dataclass field."""
    out = []
    for path, sec in sections(cls).items():
        hints = typing.get_type_hints(sec)
        out += [
            (path, f.name) for f in dataclasses.fields(sec) if not dataclasses.is_dataclass(hints[f.name])
        ]
    return out


class Reads(ast.NodeVisitor):
    """The (section path, key) reads of one module."""

    def __init__(self, tree_sections: dict[str, type]):
        self.by_class: dict[str, set[str]] = {}
        self.by_last: dict[str, set[str]] = {}
        for path, cls in tree_sections.items():
            for klass in cls.__mro__:  # a subclass (the planted test's) also answers to its base's name
                if dataclasses.is_dataclass(klass):
                    self.by_class.setdefault(klass.__name__, set()).add(path)
            if path:
                self.by_last.setdefault(path.split(".")[-1], set()).add(path)
        self.names: dict[str, set[str]] = {}
        self.reads: set[tuple[str, str]] = set()
        self.loop_constants: dict[str, list[str]] = {}

    # -------------------------------------------------------------- what an expression is
    def annotation(self, node: ast.expr | None) -> set[str]:
        if node is None:
            return set()
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "TrainConfig" (quoted)
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return set()
        found: set[str] = set()
        for sub in ast.walk(node):  # `TowerConfig | None`, `Optional[DataConfig]`
            name = (
                sub.id if isinstance(sub, ast.Name) else sub.attr if isinstance(sub, ast.Attribute) else None
            )
            found |= self.by_class.get(name or "", set())
        return found

    def section(self, node: ast.expr) -> set[str]:
        if isinstance(node, ast.Name):
            return self.names.get(node.id, set())
        if isinstance(node, ast.Attribute):
            known = self.by_last.get(node.attr, set())
            parents = self.section(node.value)
            if parents:  # narrow: cfg.model.vision -> model.vision only
                narrowed = {
                    p for p in known if p.rsplit(".", 1)[0] in parents or ("" in parents and "." not in p)
                }
                return narrowed or known
            return known
        return set()

    # -------------------------------------------------------------- bindings
    def bind(self, target: ast.expr, value: ast.expr | None, annotation: ast.expr | None = None) -> None:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for t, v in zip(target.elts, value.elts):
                self.bind(t, v)
            return
        if isinstance(target, ast.Name):
            found = self.annotation(annotation) | (self.section(value) if value is not None else set())
            if found:
                self.names.setdefault(target.id, set()).update(found)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        outer = dict(self.names)  # a function sees the module's and enclosing bindings, not its siblings'
        self.generic_visit(node)
        self.names = outer

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_arg(self, node: ast.arg) -> None:
        found = self.annotation(node.annotation)
        if found:
            self.names.setdefault(node.arg, set()).update(found)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self.bind(target, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.bind(node.target, node.value, node.annotation)
        self.generic_visit(node)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.bind(node.target, node.value)
        self.generic_visit(node)

    # -------------------------------------------------------------- reads
    def read(self, owner: ast.expr, key: str) -> None:
        for path in self.section(owner):
            self.reads.add((path, key))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.read(node.value, node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) >= 2:
            key = node.args[1]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                self.read(node.args[0], key.value)
            elif isinstance(key, ast.Name):
                for const in self.loop_constants.get(key.id, []):
                    self.read(node.args[0], const)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        # for name in ("batch_size", "threads_per_worker"): getattr(cfg, name)
        if isinstance(node.target, ast.Name) and isinstance(node.iter, (ast.Tuple, ast.List)):
            consts = [
                e.value for e in node.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
            ]
            self.loop_constants = {**self.loop_constants, node.target.id: consts}
        self.generic_visit(node)


def module_reads(source: str, tree_sections: dict[str, type]) -> set[tuple[str, str]]:
    tree = ast.parse(source)
    reads = Reads(tree_sections)
    reads.visit(tree)
    return reads.reads


def package_files() -> Iterator[Path]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.resolve() != Path(config_module.__file__).resolve():
            yield path


def all_reads(tree_sections: dict[str, type]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path in package_files():
        found |= module_reads(path.read_text(encoding="utf-8"), tree_sections)
    return found


def test_every_config_key_is_read_outside_config_py():
    tree_sections = sections()
    reads = all_reads(tree_sections)
    unread = [f"{sec}.{key}" for sec, key in leaves() if (sec, key) not in reads]
    assert not unread, (
        f"config keys accepted but never read in clipkit/ (outside config.py): {', '.join(unread)}; "
        "read each where it takes effect, or remove it"
    )


@dataclasses.dataclass(frozen=True)
class PlantedEval(config_module.EvalConfig):
    planted_key: int = 0
    seed: int = 0  # train.seed is read, eval.seed is not


@dataclasses.dataclass(frozen=True)
class PlantedConfig(Config):
    eval: PlantedEval = dataclasses.field(default_factory=PlantedEval)


def test_an_unread_key_is_caught():
    """Planted keys: a new name, and an existing common name in a section that never reads it."""
    tree_sections = sections(PlantedConfig)
    reads = all_reads(tree_sections)
    unread = {f"{sec}.{key}" for sec, key in leaves(PlantedConfig) if (sec, key) not in reads}
    assert unread == {"eval.planted_key", "eval.seed"}
    # A read of the right section counts; the same name on another section does not.
    code = "def f(cfg: Config, e: EvalConfig):\n    cfg.train.seed\n    x = cfg.eval\n    x.planted_key\n"
    assert module_reads(code, tree_sections) >= {("train", "seed"), ("eval", "planted_key")}
    assert ("eval", "seed") not in module_reads("def f(cfg: Config):\n    cfg.train.seed\n", tree_sections)
