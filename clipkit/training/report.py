"""What the training loop prints and logs: the plan at the start, and the metrics rows.

``plan_text`` is the run's plan (budget, steps, towers, trainable parameters), printed before
the first step. Between two metrics rows the loop sums each finite step's losses into a
window (``reset_window`` / ``add_to_window``); ``log`` writes the window's means as one row of
metrics.csv and TensorBoard: losses averaged over ranks (the global batch's loss, ``loss_means``),
skipped-sample counts summed over ranks (``skip_totals``), and, for a weighted mixture, the
trained samples of each source (``source_totals``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object

from clipkit.config import DataConfig
from clipkit.data import SkipStats
from clipkit.training.optim import format_summary, group_summary
from clipkit.training.precision import loss_scale
from clipkit.training.system import peak_memory_columns, rate_columns, system_lines

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
        *system_lines(run.system),
        *mixture_lines(cfg.data),
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


def mixture_lines(data: DataConfig) -> list[str]:
    """The plan's line(s) on resampling and the sources of a weighted mixture."""
    if not data.resampled:
        return []
    if not data.train_weights:
        return ["  data: shards resampled with replacement (no epochs: the epoch column stays 0)"]
    total = sum(data.train_weights)
    parts = [p.strip() for p in data.train.split("::") if p.strip()]
    return ["  data: weighted mixture, shards resampled with replacement (metrics.csv: samples_src<i>)"] + [
        f"    src{i} {w / total:.1%} (weight {w:g}): {part}"
        for i, (w, part) in enumerate(zip(data.train_weights, parts))
    ]


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


def source_totals(run: Run) -> dict[str, int]:
    """``{"samples_src<i>": trained samples from source i, summed over ranks}`` of a weighted
    mixture (``data.train_weights``; a collective with several ranks), else ``{}``."""
    n = len(run.cfg.data.train_weights)
    if not n:
        return {}
    local = run.stream.sources_seen
    parts = gather_object([local]) if run.acc.num_processes > 1 else [local]
    return {f"samples_src{i}": sum(p[i] for p in parts if i < len(p)) for i in range(n)}


def loss_means(run: Run) -> dict[str, float]:
    """The window's mean losses over its finite steps, averaged over ranks (a collective with
    several ranks). A rank's loss may score only its own rows of the global batch (``siglip``,
    ``local_loss``); the mean over ranks of the rank losses is the loss of the global batch."""
    w = run.window
    means = {k: v / max(w["steps"], 1) for k, v in w["sums"].items()}
    if run.acc.num_processes == 1 or not means:  # the same keys on every rank: steps agree on finiteness
        return means
    keys = sorted(means)
    t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=run.acc.device)
    return dict(zip(keys, run.acc.reduce(t, reduction="mean").tolist()))


def log(run: Run, last: dict[str, float]) -> None:
    """One metrics row (means over the steps since the previous row) to metrics.csv and TensorBoard."""
    skips, dropped = skip_totals(run)
    sources = source_totals(run)
    memory = peak_memory_columns(run.acc)  # peak over ranks: a collective
    losses = loss_means(run)  # mean over ranks: a collective
    if run.metrics is None:
        return
    w = run.window
    elapsed = time.perf_counter() - w["t0"]
    lr = run.cfg.optim.lr * run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)  # base lr x schedule factor
    row: dict[str, Any] = {
        "step": run.step,
        "samples_seen": run.samples_seen,
        "epoch": run.stream.epoch,
        "lr": lr,
    }
    row.update(losses)
    row.update({k: v for k, v in last.items() if k not in w["sums"]})  # scale, bias, stats
    row.update(rate_columns(w["samples"], elapsed, run.acc.num_processes))  # samples_per_s(_rank)
    row.update(memory)  # peak_mem_gib (GPU) or peak_rss_gib (CPU)
    if run.acc.scaler is not None:  # fp16
        row["loss_scale"] = loss_scale(run.acc)
        row["scaler_skipped_steps"] = run.nonfinite.overflows
    row["skipped_total"] = skips.total
    row["skipped"] = ";".join(f"{k}={v}" for k, v in sorted(skips.by_kind.items()))
    row["dropped_short_batches"] = dropped
    row["nonfinite_steps"] = run.nonfinite.total
    row.update(sources)
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
