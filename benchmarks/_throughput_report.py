"""The report of benchmarks/train_throughput.py: the results table, the description of the
machine and setups, the verdict on each setup's target, and the report itself (stdout and
runs/bench/train_throughput/; benchmarks/RESULTS.md only with --record).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform

import _record
from _throughput_common import Result, Setup, load_average

# clipkit / OpenCLIP end-to-end samples/s each setup must reach: issue #15 (small, from scratch)
# and the LiT setup's bar (feature cache included in the run).
TARGETS = {"small": 1.5, "lit": 5.0}


def fmt(x: float, nd: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{nd}f}"


def table(results: list[Result]) -> str:
    by_setup: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        by_setup.setdefault((r.setup, r.seed), {})[r.tool] = r
    rows = [
        (
            "setup",
            "seed",
            "tool",
            "samples",
            "wall s",
            "samples/s",
            "steady samples/s",
            "CPU s",
            "samples/CPU-s",
            "final loss",
            "tail loss",
            "ratio",
            "ratio steady",
            "ratio CPU",
            "load avg",
            "note",
        )
    ]

    def ratio(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")

    for (setup, seed), tools in by_setup.items():
        oc = tools.get("openclip")
        for tool, r in tools.items():
            rr = [float("nan")] * 3
            if oc is not None and tool == "clipkit":
                rr = [
                    ratio(r.e2e_sps, oc.e2e_sps),
                    ratio(r.steady_sps, oc.steady_sps),
                    ratio(r.cpu_sps, oc.cpu_sps),
                ]
            rows.append(
                (
                    setup,
                    str(seed),
                    tool,
                    str(r.samples),
                    fmt(r.wall_s, 1),
                    fmt(r.e2e_sps),
                    fmt(r.steady_sps),
                    fmt(r.cpu_s, 0),
                    fmt(r.cpu_sps),
                    fmt(r.final_loss, 4),
                    fmt(r.tail_loss(), 4),
                    *(fmt(x) for x in rr),
                    r.load,
                    r.note,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def describe(setups: list[Setup]) -> str:
    import torch

    lines = [
        (
            f"machine: {os.cpu_count()} cpus (shared; load avg now {load_average()}), torch {torch.__version__}, "
            f"python {platform.python_version()}, CPU only (CUDA_VISIBLE_DEVICES='')"
        ),
        (
            "samples/s = samples / wall s of the whole process (start-up, model build, feature cache, "
            "training, final checkpoint); steady = from per-step times after the first "
            "steps; ratio = clipkit / OpenCLIP"
        ),
    ]
    for st in setups:
        model = (
            (
                f"open_clip {st.open_clip_model} from scratch, {st.small_image_size}px, "
                f"ctx {st.small_context_length}"
            )
            if st.name == "small"
            else (
                f"tf_efficientnet_lite0 (locked={st.lock_image}) + MiniLM-L6 (locked={st.lock_text}, "
                f"top {st.text_unlocked_layers} layers trained, lr_mult {st.text_lr_mult} in clipkit only), "
                f"embed {st.embed_dim}, {st.image_size}px, ctx {st.context_length}; clipkit feature cache "
                f"{'warm' if st.warm_cache else 'built in the run'}"
            )
        )
        lines.append(
            f"{st.name}: model {model}; {len(st.shards)} shards, {st.shard_samples} samples/pass; "
            f"batch {st.batch_size}; {st.samples} samples ({st.epochs} epoch(s)); threads {st.threads} "
            f"(OMP/MKL/torch) + {st.workers} loader workers x 1 thread; "
            f"hparams {dataclasses.asdict(st.hp)}"
        )
    return "\n".join(lines)


# Equal loss curves: |clipkit - OpenCLIP| of the seeds' mean tail loss, over its standard error.
LOSS_Z_MAX = 3.0


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


# A tail loss this close to ln(batch) is chance level: the towers' outputs have collapsed.
PLATEAU_TOL = 0.002


def on_plateau(r: Result) -> bool:
    """Whether a run's tail loss sits at chance level, ln(batch size): from scratch at a high
    learning rate, a run either collapses there in its first steps or leaves it, seed by seed."""
    if len(r.curve) < 2:
        return False
    batch = r.curve[1][0] - r.curve[0][0]
    return batch > 1 and abs(r.tail_loss() - math.log(batch)) <= PLATEAU_TOL


def verdicts(results: list[Result], targets: _record.Targets) -> list[str]:
    """Per setup both tools finished: clipkit / OpenCLIP e2e samples/s (mean over seeds) >= TARGETS,
    and, for setups that train from scratch (both tools train every parameter the same way), equal
    loss: the mean over the last quarter of steps, averaged over seeds, within LOSS_Z_MAX standard
    errors (seed to seed). One seed measures no seed noise, so the loss check then says so."""
    lines = []
    for setup, want in TARGETS.items():
        runs = {
            tool: [
                r
                for r in results
                if r.setup == setup and r.tool == tool and not r.note.startswith(("exit", "not run"))
            ]
            for tool in ("clipkit", "openclip")
        }
        ck, oc = runs["clipkit"], runs["openclip"]
        if not ck or not oc:
            continue
        ck_sps, _ = _mean_sd([r.e2e_sps for r in ck])
        oc_sps, _ = _mean_sd([r.e2e_sps for r in oc])
        ratio = ck_sps / oc_sps if oc_sps else float("nan")
        ck_loss, ck_sd = _mean_sd([r.tail_loss() for r in ck])
        oc_loss, oc_sd = _mean_sd([r.tail_loss() for r in oc])
        seeds = f"{len(ck)} seed(s)" if len(ck) == len(oc) else f"{len(ck)} / {len(oc)} seeds"
        lines.append(
            targets.check(
                f"{setup}: clipkit >= {want:g}x OpenCLIP's samples/s (end to end, mean over seeds)",
                ratio >= want,
                f"{fmt(ratio)}x over {seeds}",
            )
        )
        if setup != "small" or any(math.isnan(r.tail_loss()) for r in ck + oc):
            continue
        losses = f"tail loss clipkit {fmt(ck_loss, 4)} (sd {fmt(ck_sd, 4)}), OpenCLIP {fmt(oc_loss, 4)} (sd {fmt(oc_sd, 4)})"
        if len(ck) < 2 or len(oc) < 2:
            lines.append(
                f"{setup}: equal loss curves not checked ({losses}): one seed has no noise estimate; run --seeds 0 1 2"
            )
            continue
        se = math.sqrt(ck_sd**2 / len(ck) + oc_sd**2 / len(oc))
        z = abs(ck_loss - oc_loss) / se if se > 0 else (0.0 if ck_loss == oc_loss else float("inf"))
        lines.append(
            targets.check(
                f"{setup}: equal loss within seed noise (|z| <= {LOSS_Z_MAX:g} over {seeds})",
                z <= LOSS_Z_MAX,
                f"{losses}, z {fmt(z)}",
            )
        )
        lines.append(
            f"{setup}: seeds whose tail loss is at chance level, ln(batch) +- {PLATEAU_TOL:g}: "
            f"clipkit {sum(map(on_plateau, ck))} of {len(ck)}, OpenCLIP {sum(map(on_plateau, oc))} of {len(oc)}"
        )
    return lines


def save(text: str, argv: list[str], record: bool) -> None:
    """Print where the report went; with ``record`` it is appended to RESULTS.md too."""
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    section = "\n".join([*_record.heading(stamp, "train_throughput.py", argv), text]) + "\n"
    _record.save_report("train_throughput", section, record)
