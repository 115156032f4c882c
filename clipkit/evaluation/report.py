"""Results in CLIP_benchmark's JSON format, written atomically, and printed as a table.

A result file is what ``clip_benchmark eval`` dumps (``clip_benchmark/cli.py::run``)::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": ..., "metrics": {...}, "language": "en"}

so ``clip_benchmark build`` can merge clipkit results with its own into one CSV.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipkit.data.atomic import atomic_write_text
from clipkit.errors import ClipkitError
from clipkit.registry import suggest

# CLIP_benchmark's task names (cli.py `--task` choices, plus its compositionality task).
TASKS = (
    "zeroshot_classification",
    "zeroshot_retrieval",
    "linear_probe",
    "captioning",
    "image_caption_selection",
)


def result_json(
    dataset: str,
    model_name: str,
    pretrained: str,
    task: str,
    metrics: dict[str, float],
    language: str = "en",
) -> dict[str, Any]:
    """The result dict, keys in CLIP_benchmark's order; metric values as Python floats."""
    if task not in TASKS:
        raise ClipkitError(f"unknown task '{task}';{suggest(task, list(TASKS))} known: {', '.join(TASKS)}")
    return {
        "dataset": dataset,
        "model": model_name,
        "pretrained": pretrained,
        "task": task,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "language": language,
    }


def write_result(
    path: str | Path,
    dataset: str,
    model_name: str,
    pretrained: str,
    task: str,
    metrics: dict[str, float],
    language: str = "en",
) -> dict[str, Any]:
    """Write ``result_json(...)`` to ``path`` (temporary file, fsync, rename); return it."""
    result = result_json(dataset, model_name, pretrained, task, metrics, language)
    atomic_write_text(path, json.dumps(result))
    return result


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, digits: int = 4
) -> str:
    """Rows of dicts as an aligned text table; numbers right-aligned, missing cells "-".

    Columns default to every key, in first-seen order.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c), digits) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) and bool(rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


# ----------------------------------------------------------------------------- suite summary


def summary_frame(rows: Sequence[dict[str, Any]]) -> Any:
    """Long rows ``{"model", "dataset", "task", "metric", "value"}`` -> a pandas table with one
    row per (dataset, task, metric) and one column per model, in first-seen order."""
    import pandas as pd

    df = pd.DataFrame(list(rows), columns=["model", "dataset", "task", "metric", "value"])
    wide = df.pivot_table(index=["dataset", "task", "metric"], columns="model", values="value", sort=False)
    wide.columns.name = None
    return wide.reset_index()


def to_markdown(df: Any, digits: int = 4) -> str:
    """A pandas table as a GitHub markdown table (numbers to ``digits`` decimals)."""
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, digits) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_summary(rows: Sequence[dict[str, Any]], folder: str | Path) -> Any:
    """``summary.csv`` and ``summary.md`` in ``folder``; returns the table."""
    df = summary_frame(rows)
    folder = Path(folder)
    atomic_write_text(folder / "summary.csv", df.to_csv(index=False))
    atomic_write_text(folder / "summary.md", to_markdown(df))
    return df
