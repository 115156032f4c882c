"""Run metrics: ``metrics.csv`` (one row per log step), TensorBoard events in ``tb/``, ``curves.png``.

The CSV header is fixed by the run's first row (columns a later row lacks stay empty, keys a
later row adds are left out), so one run is one table. On resume, rows and events past the
checkpoint's step are dropped first: the resumed run logs those steps again.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from clipkit.data.atomic import atomic_open, atomic_write_text


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _csv_text(header: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class MetricsLog:
    """Append rows to ``<run_dir>/metrics.csv`` and scalars to ``<run_dir>/tb``.

    ``resume_step``: the step a resumed run continues from (rows after it are removed).
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.header, rows = _read_rows(self.path)
        if resume_step is not None and rows:
            kept = [r for r in rows if int(r["step"]) <= resume_step]
            if len(kept) != len(rows):
                atomic_write_text(self.path, _csv_text(self.header, kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge)

    def write(self, row: dict[str, Any]) -> None:
        if not self.header:
            self.header = list(row)
            atomic_write_text(self.path, _csv_text(self.header, []))
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.header, extrasaction="ignore", restval="").writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, global_step=int(row["step"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(run_dir: str | Path) -> Path | None:
    """``curves.png``: loss (and its parts) and logit scale against the step; None without metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    header, rows = _read_rows(run_dir / "metrics.csv")
    if not rows:
        return None

    def col(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows]

    steps = col("step")
    parts = [h for h in header if h.startswith("loss_")]
    fig, (ax_loss, ax_scale) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, col("loss"), label="loss", linewidth=2)
    for name in parts:
        ax_loss.plot(steps, col(name), label=name, linewidth=1, alpha=0.7)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.legend()
    ax_scale.plot(steps, col("logit_scale"), color="tab:red")
    ax_scale.set(xlabel="step", ylabel="exp(log scale)", title="logit scale (1 / temperature)")
    for ax in (ax_loss, ax_scale):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out
