"""Training throughput: clipkit against ``open_clip_train.main`` on the same shards.

Two setups, each trained by both tools with the same model, shards, batch size, optimizer
settings, sample budget and thread counts:

* ``small`` -- a small built-in open_clip model config (default ``ViT-S-32-alt``) trained from
  scratch. Target: clipkit/OpenCLIP samples/s ratio >= 1.0 at equal loss after equal samples.
* ``lit`` -- the demo's LiT setup: locked EfficientNet-Lite0 (bundled ImageNet weights) plus
  all-MiniLM-L6-v2 on the emoji shards; clipkit with its feature cache against
  ``open_clip_train.main --lock-image`` (feature cache cold at the start). Target: >= 5x samples/s over a 10-epoch run, cache
  building included (end-to-end wall time).

OpenCLIP runs in its own virtualenv (``.venv-openclip``, created by
``benchmarks/setup_openclip_env.sh``): open_clip_train crashes with webdataset 1.x
(``KeyError: 'fname'``) and needs webdataset 0.2.86. clipkit runs in the main ``.venv``.

Thread counts are set deliberately and equally for both tools (``--threads`` intra-op threads
in the training process via OMP/MKL env vars and ``torch.set_num_threads``; ``--workers`` data
loader worker processes, each with one torch thread) and printed with the results.

Samples/s is reported two ways:
* ``e2e``: samples trained / wall time of the whole process (start-up, model build, feature
  cache building, data loading, training, final checkpoint). This is the number the targets use.
* ``steady``: batch_size * steps / summed step times, skipping the first ``--skip-steps`` steps
  (from the per-step log lines of each tool).
Beside them, samples per CPU-second (user + sys of the run and its loader workers): the 2 cores
here are shared, and other load inflates wall time far more than CPU time.

The LiT model/optimizer settings (batch size, lr, warmup, locking, context length, ...) are read
from clipkit's recipe ``train/lit_emoji.yaml``; the OpenCLIP run mirrors them
(``--lock-image --lock-image-freeze-bn-stats``, ``--lock-text --lock-text-unlocked-layers N``).

Usage (from the repo root, in the main venv)::

    .venv/bin/python benchmarks/train_throughput.py                      # both setups, both tools
    .venv/bin/python benchmarks/train_throughput.py --setups lit --tools openclip --lit-samples 2048
    .venv/bin/python benchmarks/train_throughput.py --synthetic 2000      # no emoji shards needed

Results are printed as a table with a verdict per setup (exit status 1 when a target is missed or
a run fails) and saved under runs/bench/train_throughput/; ``--record`` appends them, with the
command line, to benchmarks/RESULTS.md. The load average is printed at the start and the end.

The pieces live beside this file: ``_throughput_common.py`` (paths, records, running a tool),
``_throughput_setups.py`` (shards, setups), ``_throughput_openclip.py`` and ``_throughput_clipkit.py``
(one tool each) and ``_throughput_report.py`` (table, RESULTS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the sibling helper modules, however this file was loaded
    sys.path.insert(0, _HERE)

import _record
from _throughput_clipkit import run_clipkit
from _throughput_common import EMOJI_TRAIN_GLOB, ROOT
from _throughput_openclip import ensure_openclip_env, run_openclip, run_openclip_extrapolated
from _throughput_report import describe, fmt, save, table, verdicts
from _throughput_setups import build_setups, locate_shards


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--setups", default="small,lit", help="comma list of: small, lit")
    p.add_argument("--tools", default="openclip,clipkit", help="comma list of: openclip, clipkit")
    p.add_argument("--shards", default="", help=f"shard glob (default {EMOJI_TRAIN_GLOB}, built if missing)")
    p.add_argument("--synthetic", type=int, default=0, help="use N synthetic samples (4 shards) instead")
    p.add_argument("--batch-size", type=int, default=0, help="default: 64 (small), recipe's (lit)")
    p.add_argument("--small-model", default="ViT-S-32-alt", help="built-in open_clip model config")
    p.add_argument("--small-samples", type=int, default=2048)
    p.add_argument("--small-image-size", type=int, default=128)
    p.add_argument("--small-context-length", type=int, default=32)
    p.add_argument("--small-warmup", type=int, default=10, help="warmup steps of the small setup")
    p.add_argument("--small-precision", default="fp32", choices=["fp32", "bf16"], help="small: both tools")
    p.add_argument("--clipkit-set", action="append", default=[], help="small: extra clipkit override k=v")
    p.add_argument("--lit-epochs", type=int, default=10)
    p.add_argument(
        "--lit-samples", type=int, default=0, help="fixed LiT sample budget (1 epoch) instead of epochs"
    )
    p.add_argument(
        "--openclip-lit-samples",
        type=int,
        default=0,
        help=(
            "LiT: OpenCLIP trains only this many samples (1 epoch) and its wall time for the full "
            "budget is extrapolated from its steady rate (it has no cache, so every epoch costs the "
            "same); 0 = train the full budget"
        ),
    )
    p.add_argument(
        "--warm-cache", action="store_true", help="LiT: keep clipkit's feature cache (default: cold)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="train each tool once per seed (the loss check needs 2+)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in the training process")
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--skip-steps", type=int, default=3, help="steps left out of the steady-state rate")
    p.add_argument("--out", default="runs/bench", help="run folders and logs (relative to the repo root)")
    p.add_argument("--json", default="", help="also write results (with loss curves) to this JSON file")
    p.add_argument(
        "--no-warm-up",
        action="store_true",
        help="skip the untimed import of each tool's training modules before the timed runs",
    )
    _record.add_record_flag(p)
    return p


# What each tool's trainer imports, loaded once (untimed) before the timed runs: each tool has its
# own virtualenv (its own torch), and a tool whose files are not in the disk cache yet pays for
# reading them in its first run only (OpenCLIP's first seed took 26-29 s against 21-24 s for the
# next ones in two runs on 2026-12-03).
WARM_UP = {"openclip": "import open_clip_train.main", "clipkit": "import clipkit.training.loop"}


def warm_up_commands(tools: list[str]) -> list[list[str]]:
    """One ``python -c <import>`` per tool, in the tool's own interpreter."""
    return [
        [sys.executable if tool == "clipkit" else str(ensure_openclip_env()), "-c", WARM_UP[tool]]
        for tool in tools
    ]


def warm_up(tools: list[str]) -> None:
    for cmd in warm_up_commands(tools):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        state = "ok" if res.returncode == 0 else f"exit {res.returncode} (the timed run will report it)"
        print(
            f"[bench] warm-up, untimed: {cmd[-1]!r} in {cmd[0]}: {time.perf_counter() - t0:.1f} s, {state}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out_root = _record.output_dir(ROOT / args.out)
    load_start = _record.load_average()
    print(f"load average at the start (1, 5, 15 min): {load_start}", flush=True)
    shards = locate_shards(args)
    setups = build_setups(args, shards)
    info = describe(setups)
    print(info, flush=True)
    runners = {"openclip": run_openclip, "clipkit": run_clipkit}
    if not args.no_warm_up:
        warm_up(args.tools.split(","))
    results = []
    for base in setups:
        for seed in args.seeds:
            st = dataclasses.replace(base, hp=dataclasses.replace(base.hp, seed=seed))
            for tool in args.tools.split(","):
                if tool == "openclip" and st.name == "lit" and 0 < args.openclip_lit_samples < st.samples:
                    results.append(run_openclip_extrapolated(st, out_root / st.name, args))
                else:
                    results.append(runners[tool](st, out_root / st.name, args.skip_steps))
                r = results[-1]
                r.seed = seed
                print(
                    f"[bench] {st.name}/{tool} seed {seed}: {r.samples} samples, wall {fmt(r.wall_s, 1)} s, "
                    f"{fmt(r.e2e_sps)} samples/s e2e, {fmt(r.steady_sps)} steady, loss {fmt(r.final_loss, 4)} "
                    f"{r.note}",
                    flush=True,
                )
    loads = f"load average (1, 5, 15 min) {load_start} at the start, {_record.load_average()} at the end"
    targets = _record.Targets()
    failed = [r for r in results if r.note.startswith("exit")]
    text = (
        info
        + f"\n{loads}\n\n"
        + table(results)
        + "\n\n"
        + "".join(f"- {line}\n" for line in verdicts(results, targets))
        + "".join(f"- run failed: {r.setup}/{r.tool}: {r.note}\n" for r in failed)
        + f"\nVerdict: {targets.summary()}.\n\n"
        + "\n".join(f"- {r.setup}/{r.tool}/seed {r.seed}: `{r.command}`" for r in results)
    )
    print("\n" + text)
    if args.json:
        _record.write_text(args.json, json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    if args.record and failed:
        print("not appended to RESULTS.md: a run failed", flush=True)
    save(text, argv, args.record and not failed)
    return 1 if failed else targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
