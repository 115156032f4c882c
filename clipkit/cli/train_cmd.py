"""``clipkit train RECIPE [key=value ...]``: run a training recipe."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a dual encoder from a YAML recipe",
        description="Train from a recipe in train/, overridden by dotted key=value pairs "
        "(e.g. train.samples=20000 model.text.unlocked_layers=2 train.resume=latest).",
    )
    p.add_argument("recipe", help="YAML recipe, e.g. train/lit_emoji.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, then exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from clipkit.config import load_config, to_dict

    cfg = load_config(args.recipe, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from clipkit.training.loop import train

    run_dir = train(cfg)
    print(f"run folder: {run_dir}")
    return 0
