"""What each speed lever of a from-scratch training step is worth, one lever off at a time.

A diagnostic, not a comparison with another tool (train_throughput.py is that). It builds the
``small`` setup of train_throughput.py as ``benchmarks/train_profile.py`` does and times whole
optimizer steps:

    all on             clipkit as it trains (on a CPU the text packed: text_padding.packed_block)
    no pooled block    the last vision and text blocks on every row (clipkit.models.pooled_block)
    text in groups     text padded, rows in length groups (text_padding.length_groups)
    text in one group  text padded, cut to the batch's longest caption, one group
    glibc malloc       CLIPKIT_MALLOC=default: glibc's own mmap / trim thresholds (clipkit.allocator)

The first four run in one process, in turn, ``--steps`` steps each, for ``--rounds`` rounds: a
machine whose speed drifts (a shared one does, by 10-20 % between processes) then slows them
alike. The allocator is set when a process starts, so it runs as ``--repeats`` pairs of
train_profile.py processes, one with and one without, alternating, with the main process's page
faults and system time a step. Printed: medians, ranges, the ratio to all on, the load average.

    .venv/bin/python benchmarks/step_levers.py --model ViT-S-32-alt --threads 2 --workers 2
    .venv/bin/python benchmarks/step_levers.py --model clipkit-tiny-ViT --image-size 32 --context-length 16 --steps 30
    .venv/bin/python benchmarks/step_levers.py ... --text-groups   # + the text tower alone under four layouts

Run it alone on a quiet machine. ``--out FILE`` appends the tables (a tracked file only with
``--record``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import _record

IN_PROCESS = (  # name, pooled last blocks, text layout (train_profile.TEXT_LAYOUTS)
    ("all on", True, "packed"),
    ("no pooled block", False, "packed"),
    ("text in groups", True, "groups"),
    ("text in one group", True, "one group"),
)
PROCESSES = (("all on", {}), ("glibc malloc", {"CLIPKIT_MALLOC": "default"}))  # name, environment
TOTAL = re.compile(r"\| \*\*total\*\* \| ([0-9.]+) \|")
USAGE = re.compile(r"page faults ([0-9]+) / step, system time ([0-9]+) ms / step")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-S-32-alt")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="steps a configuration a round (in-process part)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the in-process configurations")
    p.add_argument("--process-steps", type=int, default=16, help="steps of each train_profile.py process")
    p.add_argument("--skip", type=int, default=4, help="first steps of a process left out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="train_profile.py pairs (allocator on / off)")
    p.add_argument(
        "--text-groups",
        action="store_true",
        help="also time the text tower alone (forward + backward): packed and under three length-group rules",
    )
    p.add_argument("--out", default="", help="also append the table (markdown) to this file")
    _record.add_record_flag(p, "allow --out to be a tracked file (e.g. benchmarks/RESULTS.md)")
    return p


def profile_once(args: argparse.Namespace, env: dict[str, str]) -> tuple[float, int, int]:
    """(ms a step, page faults a step, system ms a step) of one train_profile.py process."""
    cmd = [
        sys.executable, str(_HERE / "train_profile.py"), "--model", args.model,
        "--image-size", str(args.image_size), "--context-length", str(args.context_length),
        "--batch-size", str(args.batch_size), "--steps", str(args.process_steps), "--skip", str(args.skip),
        "--threads", str(args.threads), "--workers", str(args.workers),
    ]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    res = subprocess.run(cmd, check=False, env=full_env, capture_output=True, text=True)
    total, usage = TOTAL.search(res.stdout), USAGE.search(res.stdout)
    if res.returncode != 0 or total is None or usage is None:
        raise SystemExit(
            f"train_profile.py failed ({' '.join(cmd)}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
        )
    return float(total.group(1)), int(usage.group(1)), int(usage.group(2))


def in_process(args: argparse.Namespace) -> dict[str, list[float]]:
    """ms a step of each IN_PROCESS configuration, one mean a round."""
    import tempfile

    import torch
    import train_profile

    from clipkit.training.report import reset_window

    torch.set_num_threads(args.threads)
    parsed = train_profile.parse_args(
        ["--model", args.model, "--image-size", str(args.image_size), "--context-length", str(args.context_length),
         "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--workers", str(args.workers),
         "--steps", str(args.skip + args.rounds * args.steps * len(IN_PROCESS))]
    )  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name, _, _ in IN_PROCESS}
    with tempfile.TemporaryDirectory() as tmp:
        run = train_profile.build_run(parsed, Path(tmp) / "runs")
        reset_window(run)
        clock: dict[str, float] = {name: 0.0 for name in train_profile.PHASES}
        for _ in range(args.skip):  # warm-up, levers on
            train_profile.timed_step(run, clock)
        for r in range(args.rounds):
            for name, pooled, text in IN_PROCESS:
                train_profile.set_levers(run, pooled=pooled, text=text)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    train_profile.timed_step(run, clock)
                times[name].append(1000 * (time.perf_counter() - t0) / args.steps)
                print(f"  round {r + 1}: {name}: {times[name][-1]:.1f} ms / step", flush=True)
        train_profile.set_levers(run, pooled=True, text="packed")
        if args.text_groups:
            times.update(text_groups(run, args.rounds))
        run.metrics.close()
    return times


TEXT_RULES = (
    "text: packed",
    "text: groups, overhead scaled to the width",
    "text: groups, flat 128 tokens",
    "text: one group",
)


def text_groups(run, rounds: int, batches: int = 20) -> dict[str, list[float]]:
    """ms a batch of the text tower's forward and backward under each of TEXT_RULES, the rules
    alternating ``rounds`` times over the same ``batches`` batches of the run's own captions:
    packed (clipkit on a CPU, where the tower packs: ``text_padding.packed_block``), padded in
    length groups under clipkit's rule (``text_padding.group_overhead``) and under the rule
    before it (128 tokens whatever the width), and padded with no split."""
    import train_profile

    from clipkit.models import text_padding
    from clipkit.training import loop

    text = run.acc.unwrap_model(run.model).text
    tokens = [loop.next_micro_batches(run)[0][0]["text"] for _ in range(batches)]
    scaled, built = text_padding.group_overhead, text_padding.GROUP_OVERHEAD_TOKENS
    rules = {  # name: (text layout for train_profile.set_levers, group overhead (width, device))
        TEXT_RULES[0]: ("packed", scaled),
        TEXT_RULES[1]: ("groups", scaled),
        TEXT_RULES[2]: ("groups", lambda width, device=None: built),
        TEXT_RULES[3]: ("groups", lambda width, device=None: 10**9),
    }
    times: dict[str, list[float]] = {name: [] for name in TEXT_RULES}
    try:
        for r in range(rounds):
            for name, (layout, rule) in rules.items():
                train_profile.set_levers(run, pooled=True, text=layout)
                text_padding.group_overhead = rule
                t0 = time.perf_counter()
                for t in tokens:
                    text(t).square().sum().backward()
                times[name].append(1000 * (time.perf_counter() - t0) / batches)
                print(f"  round {r + 1}: {name}: {times[name][-1]:.1f} ms a batch", flush=True)
    finally:
        text_padding.group_overhead = scaled
        train_profile.set_levers(run, pooled=True, text="packed")
        text.zero_grad(set_to_none=True)
    return times


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before: {load}", flush=True)
    procs: dict[str, list[tuple[float, int, int]]] = {name: [] for name, _ in PROCESSES}
    for r in range(args.repeats):
        for name, env in PROCESSES if r % 2 == 0 else PROCESSES[::-1]:
            procs[name].append(profile_once(args, env))
            ms, faults, sys_ms = procs[name][-1]
            print(
                f"  pair {r + 1}: {name}: {ms:.1f} ms / step, {faults} faults, {sys_ms} ms system", flush=True
            )
    times = in_process(args)
    setup = (
        f"model {args.model} @ {args.image_size}px, context {args.context_length}, batch {args.batch_size}, "
        f"threads {args.threads}, workers {args.workers}"
    )
    base = statistics.median(times["all on"])
    lines = [
        f"{setup}; one process, {args.rounds} rounds of {args.steps} steps a configuration in turn",
        "",
        "| configuration | ms / step (median of rounds) | range | vs all on |",
        "|---|---:|---:|---:|",
    ]
    for name, _, _ in IN_PROCESS:
        med = statistics.median(times[name])
        lines.append(
            f"| {name} | {med:.1f} | {min(times[name]):.1f}-{max(times[name]):.1f} | {med / base:.3f}x |"
        )
    if args.text_groups:
        base = statistics.median(times[TEXT_RULES[0]])
        lines += [
            "",
            (
                f"{setup}; the text tower alone, forward and backward of 20 batches of the run's "
                f"captions, {args.rounds} rounds of the four layouts in turn"
            ),
            "",
            "| text layout | ms a batch (median of rounds) | range | vs packed |",
            "|---|---:|---:|---:|",
        ]
        for name in TEXT_RULES:
            med = statistics.median(times[name])
            lines.append(
                f"| {name} | {med:.1f} | {min(times[name]):.1f}-{max(times[name]):.1f} | {med / base:.3f}x |"
            )
    base = statistics.median(x[0] for x in procs["all on"])
    lines += [
        "",
        (
            f"{setup}; {args.repeats} alternating train_profile.py processes each, "
            f"{args.process_steps - args.skip} timed steps a process; page faults and system time of "
            "the main process"
        ),
        "",
        "| configuration | ms / step (median) | range | vs all on | page faults / step | system ms / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, _ in PROCESSES:
        ms = [x[0] for x in procs[name]]
        med = statistics.median(ms)
        lines.append(
            f"| {name} | {med:.1f} | {min(ms):.1f}-{max(ms):.1f} | {med / base:.3f}x | "
            f"{statistics.median(x[1] for x in procs[name]):.0f} | {statistics.median(x[2] for x in procs[name]):.0f} |"
        )
    lines += ["", f"load average before {load}, after " + " ".join(f"{x:.2f}" for x in os.getloadavg())]
    title = f"Step levers: {args.model}, one lever off at a time ({time.strftime('%Y-%m-%d %H:%M')})"
    heading = _record.heading(title, "step_levers.py", argv)
    text = "\n".join(heading + lines) + "\n"
    print("\n" + text)
    if args.out:
        _record.append_text(args.out, text + "\n", record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
