"""What the training loop prints and logs: the plan at the start, and the metrics rows.

``plan_text`` is the run's plan (budget, steps, towers, trainable parameters), printed before
the first step. Between two metrics rows the loop sums each finite step's losses into a
window (``reset_window`` / ``add_to_window``); ``log`` writes the window's means as one row of
metrics.csv and TensorBoard, with skipped-sample counts summed over ranks (``skip_totals``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object

from clipkit.data import SkipStats
from clipkit.training.optim import format_summary, group_summary

if TYPE_CHECKING:
    from clipkit.training.loop import Run


def plan_text(run: Run) -> str:
    cfg, acc = run.cfg, run.acc
    last = run.budget - (run.total_steps - 1) * run.per_step
    start = f"resuming {run.resumed_from} at step {run.step}" if run.resumed_from else "fresh"
    lines = [
        f"clipkit train: {run.run_dir} ({start})",
        (
            f"  device {acc.device}, {acc.num_processes} process(es), {torch.get_num_threads()} torch thread(s), "
            f"precision {cfg.train.precision}"
        ),
        (
            f"  budget {run.budget:,} samples = {run.total_steps:,} steps of {run.per_step:,} "
            f"(batch {cfg.data.batch_size} x accum {cfg.optim.accum_steps} x {acc.num_processes} rank(s)); "
            f"last step {last:,} samples"
            + (
                f"; train.samples rounded up to a multiple of {acc.num_processes} ranks"
                if run.budget != cfg.train.samples
                else ""
            )
        ),
        (
            f"  checkpoints every {cfg.train.checkpoint_every} steps (keep {cfg.train.keep_last}), "
            f"metrics every {cfg.train.log_every} steps"
        ),
        f"  feature cache: {run.cache_note}",
        *(
            f"  {name} tower {t['spec']}: {t['trainable_params']:,} of {t['params']:,} params trainable"
            + (
                f", locked with the top {t['unlocked_layers']} of {t['layers']} layers unlocked"
                if t["locked"]
                else ""
            )
            for name, t in acc.unwrap_model(run.model).locked_state().items()
        ),
        "  trainable parameters:",
        format_summary(group_summary(run.optimizer)),
    ]
    return "\n".join(lines)


def skip_totals(run: Run) -> tuple[SkipStats, int]:
    """Skipped-sample counts and dropped short-batch samples summed over ranks (a collective)."""
    local = (dict(run.stream.skip.by_kind), run.stream.skip.seen, run.stream.dropped)
    parts = gather_object([local]) if run.acc.num_processes > 1 else [local]
    total, dropped = SkipStats(), 0
    for by_kind, seen, drop in parts:
        total.by_kind.update(by_kind)
        total.seen += seen
        dropped += drop
    return total, dropped


def log(run: Run, last: dict[str, float]) -> None:
    """One metrics row (means over the steps since the previous row) to metrics.csv and TensorBoard."""
    skips, dropped = skip_totals(run)
    if run.metrics is None:
        return
    w = run.window
    elapsed = time.perf_counter() - w["t0"]
    lr = run.cfg.optim.lr * run.scheduler.get_last_lr()[0] / run.scheduler.base_lrs[0]
    row: dict[str, Any] = {
        "step": run.step,
        "samples_seen": run.samples_seen,
        "epoch": run.stream.epoch,
        "lr": lr,
    }
    row.update({k: v / max(w["steps"], 1) for k, v in w["sums"].items()})  # finite steps only
    row.update({k: v for k, v in last.items() if k not in w["sums"]})  # scale, bias, stats
    row["samples_per_s"] = w["samples"] / max(elapsed, 1e-9)
    row["skipped_total"] = skips.total
    row["skipped"] = ";".join(f"{k}={v}" for k, v in sorted(skips.by_kind.items()))
    row["dropped_short_batches"] = dropped
    row["nonfinite_steps"] = run.nonfinite.total
    run.metrics.write(row)


def reset_window(run: Run) -> None:
    run.window = {"t0": time.perf_counter(), "samples": 0, "steps": 0, "sums": {}}


def add_to_window(run: Run, result: dict[str, float], samples: int) -> None:
    w = run.window
    w["samples"] += samples
    if result["nonfinite"]:
        return  # a skipped step's NaN would hide the other steps' mean
    w["steps"] += 1
    for k, v in result.items():
        if k == "loss" or k.startswith("loss_"):
            w["sums"][k] = w["sums"].get(k, 0.0) + v
