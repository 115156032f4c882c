"""``clipkit demo``: build real data, train LiT on the CPU, print before/after scores."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the embedded default job: emoji shards -> LiT training -> zero-shot and retrieval scores",
        description="Builds the emoji and Animal-MNIST sets from installed packages, trains "
        "train/lit_mix.yaml (or --recipe) and prints zero-shot Animal-MNIST and emoji retrieval scores "
        "before and after training. Extra key=value pairs override the recipe.",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe")
    p.add_argument(
        "--recipe",
        default=None,
        help="training recipe (default: train/lit_mix.yaml); the bundled sources its data.train "
        "and data.val read from data/<name>/ (e.g. openclipart for train/lit_mix.yaml) are built first",
    )
    p.add_argument("--data", default="data", help="folder for the built datasets (default: data)")
    p.add_argument(
        "--zeroshot-per-class",
        type=int,
        default=100,
        help="Animal-MNIST images per class to score (0 = all 1,000; default 100 keeps the demo short)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="train on this many samples, read from the first training shards that hold them "
        "(default: the recipe's train.samples over all its shards); a few hundred make a one-minute check",
    )
    p.add_argument(
        "--retrieval-pairs",
        type=int,
        default=0,
        help="emoji val pairs to score retrieval on, the first N (default 0 = all 392)",
    )
    p.add_argument(
        "--out", default=None, help="runs folder for the run (default: the recipe's train.output_dir)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from clipkit.cli.demo import RECIPE, run_demo

    out = Path(args.out) if args.out else None
    run_demo(
        args.overrides, Path(args.data), args.zeroshot_per_class, args.recipe or RECIPE,
        samples=args.samples, retrieval_pairs=args.retrieval_pairs, out=out,
    )  # fmt: skip
    return 0
