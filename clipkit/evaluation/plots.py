"""Charts of a suite run: one bar chart of the headline scores, a confusion matrix per
zero-shot dataset. Drawn on matplotlib ``Figure`` objects (no pyplot state, no display
needed) and written atomically as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.data.atomic import atomic_write_bytes

# The bar chart's metric(s) per task.
HEADLINE = {
    "zeroshot_classification": ("acc1",),
    "zeroshot_retrieval": ("image_retrieval_recall@1", "text_retrieval_recall@1"),
    "linear_probe": ("lp_acc1",),
}
SHORT = {"image_retrieval_recall@1": "text->image R@1", "text_retrieval_recall@1": "image->text R@1"}


def _save(fig: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def bar_chart(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per (dataset, headline metric), one bar per model."""
    from matplotlib.figure import Figure

    groups: list[tuple[str, str]] = []
    models: list[str] = []
    value: dict[tuple[str, str, str], float] = {}
    for r in rows:
        if r["metric"] not in HEADLINE.get(r["task"], ()):
            continue
        g = (r["dataset"], r["metric"])
        groups += [g] if g not in groups else []
        models += [r["model"]] if r["model"] not in models else []
        value[(r["model"], *g)] = float(r["value"])
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(models)) ** 0.5 + 2), 4))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    x = np.arange(len(groups))
    for i, m in enumerate(models):
        ys = [value.get((m, *g), np.nan) for g in groups]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, ys, width, label=m)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, [f"{d}\n{SHORT.get(m, m)}" for d, m in groups], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title or "evaluation")
    if models:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(pred)), 1)
    return cm


def confusion_png(
    labels: np.ndarray, pred: np.ndarray, classnames: list[str], path: str | Path, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (recall per true class on the diagonal)."""
    from matplotlib.figure import Figure

    c = len(classnames)
    cm = confusion_matrix(labels, pred, c).astype(float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(12.0, 2.5 + 0.35 * c)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if c <= 40:
        ax.set_xticks(range(c), classnames, rotation=90, fontsize=7)
        ax.set_yticks(range(c), classnames, fontsize=7)
        if c <= 15:
            for i in range(c):
                for j in range(c):
                    if cm[i, j]:
                        color = "black" if norm[i, j] > 0.5 else "white"
                        ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=6, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
