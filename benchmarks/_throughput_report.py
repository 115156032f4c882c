"""The report of benchmarks/train_throughput.py: the results table, the description of the
machine and setups, and the record appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import shlex

from _throughput_common import RESULTS_MD, Result, Setup, load_average


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


def append_results(text: str, argv: list[str]) -> None:
    head = (
        ""
        if RESULTS_MD.exists()
        else "# Training throughput results\n\nAppended by benchmarks/train_throughput.py.\n"
    )
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    with open(RESULTS_MD, "a") as f:
        f.write(
            f"{head}\n## {stamp}\n\n```\n{shlex.join(['python', 'benchmarks/train_throughput.py', *argv])}\n```\n\n"
            f"{text}\n"
        )
