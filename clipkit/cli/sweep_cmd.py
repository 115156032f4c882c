"""``clipkit sweep SWEEP.yaml [key=value ...]``: a recipe's variants over seeds, trained and evaluated."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train and evaluate a recipe's variants (named, grid, random) over seeds; compare them",
        description="Runs every (variant, seed) of a sweep file (clipkit.sweep.spec documents it) as "
        "'clipkit train' in its own process, evaluates each with the file's suite, and writes "
        "results.csv/.parquet, summary.md (mean ± std over seeds, z against the baseline) and "
        "summary.png in the output folder (prefixed by the sweep's name when another sweep reported "
        "there first). Every variant's config is checked before the first run. "
        "Run the same command again after a kill: finished runs are skipped, interrupted ones resume.",
    )
    p.add_argument(
        "sweep", help="sweep file (YAML): recipe, suite, seeds, baseline, variants / grid / random"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides for every run, after the variant's"
    )
    p.add_argument("--output", help="output folder (default: the file's 'output:', else runs/sweeps/<name>)")
    p.add_argument("--seeds", help="comma-separated seeds instead of the file's (e.g. 0 for a quick look)")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at once (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="T",
        help="train.threads of every run (default: cores // N with --parallel N, else the recipe's)",
    )
    p.add_argument("--device", default="auto", help="evaluation device: auto, cpu, cuda, cuda:1")
    p.add_argument(
        "--dry-run", action="store_true", help="check every config, print the plan and what is done"
    )
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the reports from finished runs; run nothing"
    )
    p.add_argument(
        "--summary-out",
        type=Path,
        metavar="PATH",
        help="also write the markdown summary to PATH, its plot beside it (PATH with .png)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from clipkit.errors import ClipkitError
    from clipkit.sweep import Options, load_sweep, run_sweep

    if args.parallel < 1 or (args.threads is not None and args.threads < 1):
        raise ClipkitError("--parallel and --threads must be at least 1")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ClipkitError(
            f"--seeds takes comma-separated integers (e.g. 0,1,2), got {args.seeds!r}"
        ) from None
    sweep = load_sweep(args.sweep, args.overrides, args.output, seeds)
    opts = Options(
        parallel=args.parallel,
        threads=args.threads,
        device=args.device,
        dry_run=args.dry_run,
        run=not args.report_only,
        summary_out=args.summary_out,
    )
    failed = run_sweep(sweep, opts, log=lambda msg: print(msg, flush=True))
    if failed:
        print(f"clipkit sweep: {failed} run(s) failed (see the summary); run again to retry them")
    return 1 if failed else 0
