"""The demo recipe trained with the locked-tower feature cache on and off: steps/s side by side.

    .venv/bin/python benchmarks/feature_cache_speedup.py                     # 30 steps each, all emoji shards
    .venv/bin/python benchmarks/feature_cache_speedup.py --shards 2 --steps 10   # a quick look
    .venv/bin/python benchmarks/feature_cache_speedup.py --record            # + a section in RESULTS.md

Method. The emoji training shards (``data/emoji/train``, built when missing) are copied into
``--out``/shards, so the cache clipkit keeps beside them is this benchmark's own. Each run is one
``clipkit train train/lit_emoji.yaml`` process with the same batch, thread count (OMP/MKL and
``train.threads``), loader workers and ``--steps`` optimizer steps (``train.samples = steps x
batch``), logging every step, final checkpoint only, no validation set:

1. cache on, cold: the cache is deleted first, so this run fills it for every training image;
2. cache off (``train.feature_cache=false``): every step runs EfficientNet-Lite0 on its batch;
3. cache on, warm: the cache from run 1.

Runs 2 and 3 are repeated ``--repeats`` times, alternating. Reported per run: steady steps/s
(from the per-step times in ``metrics.csv``, the first ``--skip-steps`` left out), wall time of
the whole process, and the load average; then the speed-up, steady steps/s warm over off (medians),
and the cold run's wall over the uncached run's (the cache pays for itself only over enough steps).
No target unless ``--min-speedup X`` is given (exit 1 when the steady speed-up is below X). The
report goes to stdout and runs/bench/feature_cache_speedup/, and to RESULTS.md with ``--record``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the sibling helper modules, however this file was loaded
    sys.path.insert(0, _HERE)

import _record
from _throughput_clipkit import read_clipkit_metrics
from _throughput_common import LIT_RECIPE, MAIN_ENV, ROOT, load_average, rel, run_logged, shard_spec
from _throughput_setups import clear_feature_cache, private_copy

EMOJI_TRAIN = ROOT / "data" / "emoji" / "train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--shards", type=int, default=0, help="use only the first N training shards (0 = all)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (cache off, cache on warm)")
    p.add_argument("--skip-steps", type=int, default=3, help="first steps left out of the steady rate")
    p.add_argument("--min-speedup", type=float, default=0.0, help="target: steady speed-up >= X (0 = none)")
    p.add_argument("--out", type=Path, default=_record.RUNS / "feature_cache_speedup")
    _record.add_record_flag(p)
    return p


def training_shards(out: Path, first: int) -> list[str]:
    """The emoji training shards, copied into ``out``/shards (built first when missing)."""
    import subprocess

    paths = sorted(EMOJI_TRAIN.glob("shard-*.tar"))
    if not paths:
        cmd = [str(MAIN_ENV / "bin" / "python"), "-m", "data_tools.build_emoji", "--out", "data/emoji"]
        print("emoji shards missing; building them:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        paths = sorted(EMOJI_TRAIN.glob("shard-*.tar"))
    return private_copy([str(p) for p in paths[: first or None]], out / "shards")


def train_once(label: str, cache: bool, shards: list[str], args: argparse.Namespace, n: int) -> dict:
    """One ``clipkit train`` process; returns its row (steady steps/s, wall s, load, command)."""
    name = f"{label.replace(' ', '-').replace(',', '')}-{n}"
    run_dir = args.out / "runs"
    overrides = [
        f"data.train={shard_spec(shards)}",
        "data.val=",
        f"data.batch_size={args.batch_size}",
        f"data.workers={args.workers}",
        f"train.samples={args.steps * args.batch_size}",
        f"train.feature_cache={'true' if cache else 'false'}",
        f"train.threads={args.threads}",
        "train.log_every=1",
        "train.checkpoint_every=0",
        f"train.output_dir={run_dir}",
        f"train.run_name={name}",
    ]
    cmd = [rel(MAIN_ENV / "bin" / "clipkit"), "train", rel(LIT_RECIPE), *overrides]
    log = run_dir / f"{name}.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    code, wall, cpu = run_logged(cmd, log, args.threads)
    if code != 0:
        sys.exit(f"{label} run failed (exit {code}); see {log}:\n{log.read_text(errors='replace')[-3000:]}")
    samples, sps, _, _ = read_clipkit_metrics(run_dir / name, args.skip_steps)
    row = {"run": label, "steps_per_s": sps / args.batch_size, "wall_s": wall, "cpu_s": cpu,
           "samples": samples, "load": load_average(), "command": " ".join(cmd)}  # fmt: skip
    print(
        f"{label:16s} {row['steps_per_s']:7.3f} steps/s steady, wall {wall:6.1f} s (load {row['load']})",
        flush=True,
    )
    return row


def report(
    rows: list[dict], args: argparse.Namespace, argv: list[str], setting: tuple[int, str, str]
) -> tuple[str, float]:
    """(the report's markdown, steady speed-up warm / off); ``setting`` = (shards, load at start, at end)."""
    n_shards, *loads = setting
    median = {
        k: statistics.median(r["steps_per_s"] for r in rows if r["run"] == k)
        for k in ("cache off", "cache on, warm")
    }
    speedup = median["cache on, warm"] / median["cache off"]
    off_wall = statistics.median(r["wall_s"] for r in rows if r["run"] == "cache off")
    cold = next(r for r in rows if r["run"] == "cache on, cold")
    title = f"Feature cache on vs off, demo recipe ({time.strftime('%Y-%m-%d %H:%M')})"
    lines = [
        *_record.heading(title, "feature_cache_speedup.py", argv),
        (f"`{rel(LIT_RECIPE)}` on {n_shards} emoji shards, {args.steps} steps of "
        f"{args.batch_size}, {args.threads} torch threads, {args.workers} loader workers; steady = per-step "
        f"times after the first {args.skip_steps} steps; load average (1, 5, 15 min) {loads[0]} at the start, "
        f"{loads[1]} at the end.\n"),
        "| run | steady steps/s | wall s (whole process) | CPU s | load avg at the end |",
        "|---|---|---|---|---|",
        *(f"| {r['run']} | {r['steps_per_s']:.3f} | {r['wall_s']:.1f} | {r['cpu_s']:.0f} | {r['load']} |" for r in rows),
        "",
        f"- steady speed-up with the cache (warm / off, medians): **{speedup:.1f}x**",
        (f"- cold-cache run (fills the cache for every training image) wall / uncached wall: "
        f"{cold['wall_s'] / off_wall:.2f}x over {args.steps} steps"),
        "",
        f"Commands: `{cold['command']}`; the uncached run adds `train.feature_cache=false`.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n", speedup


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.out = _record.output_dir(args.out.resolve())
    loads = [_record.load_average()]
    print(f"load average at the start (1, 5, 15 min): {loads[0]}", flush=True)
    shards = training_shards(args.out, args.shards)
    clear_feature_cache(shards)  # run 1 fills the cache: it is this benchmark's own copy
    rows = [train_once("cache on, cold", True, shards, args, 0)]
    for n in range(args.repeats):
        order = [("cache off", False), ("cache on, warm", True)]
        for label, cache in order if n % 2 == 0 else order[::-1]:
            rows.append(train_once(label, cache, shards, args, n))
    loads.append(_record.load_average())
    print(f"load average at the end (1, 5, 15 min): {loads[1]}", flush=True)
    text, speedup = report(rows, args, argv, (len(shards), loads[0], loads[1]))
    targets = _record.Targets()
    if args.min_speedup:
        line = targets.check(
            f"steady speed-up >= {args.min_speedup:g}x", speedup >= args.min_speedup, f"{speedup:.1f}x"
        )
        text += f"- {line}\n"
    print(text, flush=True)
    _record.save_report("feature_cache_speedup", text, args.record)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
