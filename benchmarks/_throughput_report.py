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
    by_setup: dict[str, dict[str, Result]] = {}
    for r in results:
        by_setup.setdefault(r.setup, {})[r.tool] = r
    rows = [
        (
            "setup",
            "tool",
            "samples",
            "wall s",
            "samples/s",
            "steady samples/s",
            "CPU s",
            "samples/CPU-s",
            "final loss",
            "ratio",
            "ratio steady",
            "ratio CPU",
            "load avg",
            "note",
        )
    ]

    def ratio(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")

    for setup, tools in by_setup.items():
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
                    tool,
                    str(r.samples),
                    fmt(r.wall_s, 1),
                    fmt(r.e2e_sps),
                    fmt(r.steady_sps),
                    fmt(r.cpu_s, 0),
                    fmt(r.cpu_sps),
                    fmt(r.final_loss, 4),
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


def verdicts(results: list[Result], targets: _record.Targets) -> list[str]:
    """One target line per setup both tools finished: clipkit / OpenCLIP e2e samples/s >= TARGETS."""
    lines = []
    for setup, want in TARGETS.items():
        by_tool = {r.tool: r for r in results if r.setup == setup}
        ck, oc = by_tool.get("clipkit"), by_tool.get("openclip")
        if (
            ck is None
            or oc is None
            or ck.note.startswith(("exit", "not run"))
            or oc.note.startswith(("exit", "not run"))
        ):
            continue
        ratio = ck.e2e_sps / oc.e2e_sps if oc.e2e_sps else float("nan")
        lines.append(
            targets.check(
                f"{setup}: clipkit >= {want:g}x OpenCLIP's samples/s (end to end)",
                ratio >= want,
                f"{fmt(ratio)}x; final loss clipkit {fmt(ck.final_loss, 4)}, OpenCLIP {fmt(oc.final_loss, 4)}",
            )
        )
    return lines


def save(text: str, argv: list[str], record: bool) -> None:
    """Print where the report went; with ``record`` it is appended to RESULTS.md too."""
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    section = f"## {stamp}\n\n```\n{_record.command_line('train_throughput.py', argv)}\n```\n\n{text}\n"
    _record.save_report("train_throughput", section, record)
