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
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and predicted peak memory, then exit",
    )
    p.add_argument(
        "--find-batch-size",
        type=float,
        metavar="GIB",
        help="probe the largest data.batch_size whose training step fits GIB gibibytes per device, then exit",
    )
    p.add_argument("--world-size", type=int, default=1, help="ranks the estimate is for (default 1)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from clipkit.config import load_config, to_dict

    cfg = load_config(args.recipe, args.overrides)
    micro = cfg.train.grad_cache_micro_batch or None
    if args.dry_run:
        from clipkit.training.memory import estimate_peak_memory, format_estimate

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(format_estimate(estimate_peak_memory(cfg, world_size=args.world_size, micro_batch=micro)))
        return 0
    if args.find_batch_size:
        from clipkit.training.memory import find_batch_size

        budget = int(args.find_batch_size * 2**30)
        best = find_batch_size(cfg, budget, world_size=args.world_size, micro_batch=micro, log=print)
        print(f"data.batch_size={best}")
        return 0
    from clipkit.training.loop import train

    run_dir = train(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:  # once, not once per rank under torchrun
        print(f"run folder: {run_dir}")
    return 0
