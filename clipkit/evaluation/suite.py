"""Benchmark suites: YAML files in ``eval/`` listing datasets, each with its task and prompts.

```yaml
name: demo                      # optional; names the output folder's summary
defaults: {alpha: white}        # optional; keys applied to every dataset
datasets:
  - name: animal_mnist          # unique; names the result file
    task: zeroshot              # zeroshot | retrieval | linear_probe
    path: data/animal_mnist     # any dataset spec (clipkit.evaluation.dataspec)
    templates: [a photo of a {c}.]   # optional: list, {class: [prompts]}, or a file
  - name: emoji_val
    task: retrieval
    path: data/emoji
    split: val
```

Every key of an entry is a field of ``SuiteEntry`` below; an unknown key or a wrong type
stops the run before any model is loaded, naming the key and the nearest valid one. File
paths (``path``, ``classnames`` / ``templates`` files) are relative to the suite file's folder
unless absolute; a path that exists relative to the working directory is taken as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipkit.config import ConfigError, from_dict
from clipkit.evaluation.datasets import check_templates, read_classnames, read_templates
from clipkit.evaluation.dataspec import FORMATS
from clipkit.evaluation.source import EvalDataError
from clipkit.registry import suggest

TASK_ALIASES = {
    "zeroshot": "zeroshot_classification",
    "zeroshot_classification": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "zeroshot_retrieval": "zeroshot_retrieval",
    "linear_probe": "linear_probe",
}


class SuiteError(EvalDataError):
    """A suite file that does not describe a runnable benchmark."""


@dataclass(frozen=True)
class SuiteEntry:
    # Unique name of this dataset in the suite: names its result file and table row.
    name: str = ""
    # zeroshot | retrieval | linear_probe (CLIP_benchmark's long names work too).
    task: str = ""
    # Dataset spec: a CLIP_benchmark folder, clipkit shards, an image folder or a manifest.
    path: str = ""
    # Force the layout instead of detecting it: wds | shards | manifest | folder.
    format: str = ""
    # Split to evaluate ("" = the layout's default: test for CLIP_benchmark folders).
    split: str = ""
    # Transparency: composite on white (clipkit) or drop it (what CLIP_benchmark does).
    alpha: Literal["white", "drop"] = "white"
    # Zero-shot: class names (list or file, one per line) and prompts (list with {c}, dict
    # {class name: [prompts]}, or file); default: the dataset's own files.
    classnames: list[str] | str | None = None
    templates: list[str] | dict[str, Any] | str | None = None
    # Retrieval: recall@k for each k.
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    # Linear probe: training split, validation split or proportion, few-shot k (-1 = all).
    train_split: str = "train"
    val_split: str = ""
    val_proportion: float = 0.2
    k_shot: int = -1
    # Linear probe on a dataset with one labelled split: train on it and test on a stable
    # `holdout` fraction of it instead (split by a hash of the sample key), e.g. 0.3.
    holdout: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Suite:
    name: str
    entries: tuple[SuiteEntry, ...]
    folder: Path = Path(".")


def _resolve(path: str, folder: Path) -> str:
    """``path`` as given when absolute or existing from the working directory, else relative to
    the suite's ``folder``; a ``format:`` prefix and a ``:split`` suffix are kept."""
    prefix, rest = "", path
    head, sep, tail = path.partition(":")
    if sep and head in FORMATS:
        prefix, rest = head + ":", tail
    base = rest.split(":")[0]
    p = Path(base).expanduser()
    if not base or p.is_absolute() or p.exists() or not (folder / base).exists():
        return path
    return prefix + str(folder / rest)


def _entry(raw: Any, where: str, defaults: dict[str, Any], folder: Path) -> SuiteEntry:
    if not isinstance(raw, dict):
        raise SuiteError(f"{where} must be a mapping with name, task and path, got {raw!r}")
    try:
        entry = from_dict(SuiteEntry, {**defaults, **raw}, prefix=f"{where}.")
    except ConfigError as err:
        raise SuiteError(str(err).replace("config key", "suite key")) from None
    for key in ("name", "task", "path"):
        if not getattr(entry, key):
            raise SuiteError(f"{where} has no '{key}'")
    if entry.task not in TASK_ALIASES:
        raise SuiteError(
            f"{where}: unknown task '{entry.task}';{suggest(entry.task, list(TASK_ALIASES))} "
            "tasks: zeroshot, retrieval, linear_probe"
        )
    changes: dict[str, Any] = {"task": TASK_ALIASES[entry.task], "path": _resolve(entry.path, folder)}
    if isinstance(entry.classnames, str):
        changes["classnames"] = read_classnames(Path(_resolve(entry.classnames, folder)))
    if isinstance(entry.templates, str):
        changes["templates"] = read_templates(Path(_resolve(entry.templates, folder)))
    elif isinstance(entry.templates, list):
        check_templates([str(t) for t in entry.templates], f"{where}.templates")
    elif isinstance(entry.templates, dict):
        bad = [k for k, v in entry.templates.items() if not isinstance(v, list) or not v]
        if bad:
            raise SuiteError(f"{where}.templates: class '{bad[0]}' needs a non-empty list of prompts")
    if entry.holdout and not 0.0 < entry.holdout < 1.0:
        raise SuiteError(f"{where}.holdout must be in (0, 1), got {entry.holdout}")
    return SuiteEntry(**{**entry.__dict__, **changes})


def parse_suite(data: Any, source: str = "suite", folder: Path = Path(".")) -> Suite:
    if not isinstance(data, dict):
        raise SuiteError(f"{source} must hold a mapping with a 'datasets' list")
    unknown = [k for k in data if k not in ("name", "defaults", "datasets")]
    if unknown:
        known = ["name", "defaults", "datasets"]
        raise SuiteError(f"{source}: unknown key '{unknown[0]}';{suggest(unknown[0], known)} keys: {known}")
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise SuiteError(f"{source} lists no datasets (a 'datasets:' list of name / task / path entries)")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise SuiteError(f"{source}: 'defaults' must be a mapping")
    entries = tuple(_entry(d, f"{source}: datasets[{i}]", defaults, folder) for i, d in enumerate(datasets))
    names = [e.name for e in entries]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise SuiteError(f"{source}: dataset name '{dup}' is used twice; names must be unique")
    return Suite(str(data.get("name") or Path(source).stem), entries, folder)


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        here = sorted(p.name for p in Path("eval").glob("*.yaml")) if Path("eval").is_dir() else []
        raise SuiteError(
            f"suite '{path}' not found" + (f"; suites in eval/: {', '.join(here)}" if here else "")
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SuiteError(f"{path} is not valid YAML: {err}") from None
    return parse_suite(data, str(path), path.parent)
