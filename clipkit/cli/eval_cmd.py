"""``clipkit eval TASK --model SPEC --dataset SPEC``: CLIP_benchmark-format scores, faster, for more models.

TASK is ``zeroshot``, ``retrieval``, ``linear_probe`` or ``all`` (a suite from ``eval/``). The
first-cut form ``clipkit eval --model RUN --zeroshot DIR --retrieval DIR`` still works.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

TASKS = ("zeroshot", "retrieval", "linear_probe", "all")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="zero-shot classification, retrieval and linear probes of any dual encoder",
        description="Models: a clipkit run folder or checkpoint, open_clip:<config>[@<weights file>] "
        "(config: name, JSON file or local-dir:<dir>), hf-clip:<local HF CLIP/SigLIP folder>, a recipe "
        ".yaml (projections untrained) or package.module:function (clipkit.models.specs). "
        "Datasets: [wds:|shards:|folder:|manifest:]PATH[:SPLIT]: a CLIP_benchmark webdataset folder, "
        "clipkit shards, a folder of class folders, or a CSV/parquet manifest. "
        "Suites: YAML files in eval/. Writes <output>/<model>/<dataset>_<task>.json (CLIP_benchmark "
        "format); with --report (default for 'all'), summary.csv/.md, scores.png and confusion matrices.",
    )
    p.add_argument("task", nargs="?", choices=TASKS, help="what to run (default: all with --suite)")
    p.add_argument(
        "--model", action="append", required=True, metavar="SPEC", help="repeat for several models"
    )
    p.add_argument("--dataset", action="append", default=[], metavar="SPEC", help="repeat for several")
    p.add_argument("--suite", metavar="YAML", help="a suite file (eval/*.yaml); task 'all'")
    p.add_argument("--zeroshot", action="append", default=[], metavar="DIR[:SPLIT]", help=argparse.SUPPRESS)
    p.add_argument("--retrieval", action="append", default=[], metavar="DIR[:SPLIT]", help=argparse.SUPPRESS)
    d = p.add_argument_group("datasets given with --dataset")
    d.add_argument("--split", default="", help="split to evaluate (default: the layout's, test for wds)")
    d.add_argument("--format", default="", choices=["", "wds", "shards", "manifest", "folder"])
    d.add_argument(
        "--alpha", default="white", choices=["white", "drop"], help="drop = CLIP_benchmark's decoding"
    )
    d.add_argument("--classnames", help="zero-shot class names file (one per line)")
    d.add_argument("--templates", help="zero-shot prompts file (one per line, with {c})")
    d.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10])
    d.add_argument("--train-split", default="train", help="linear probe training split")
    d.add_argument("--val-split", default="", help="linear probe validation split (else --val-proportion)")
    d.add_argument("--val-proportion", type=float, default=0.2)
    d.add_argument("--k-shot", type=int, default=-1, help="linear probe: samples per class (-1 = all)")
    d.add_argument("--holdout", type=float, default=0.0, help="linear probe on one split: test fraction")
    d.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--workers", type=int, default=0, help="image-decoding loader processes")
    r.add_argument("--threads", default="auto", help="torch threads; auto = idle cores minus workers")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (auto: cuda when available)")
    r.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="fp32 (default: CLIP_benchmark's scores) or bf16 autocast, faster where the CPU/GPU has native "
        "bf16 (refused where it has not), scores within bf16's ~3 digits",
    )
    r.add_argument("--output", default="eval_results", help="results folder (default: eval_results)")
    r.add_argument(
        "--cache-dir",
        default=".cache/clipkit/eval_features",
        help="feature cache: linear-probe features, and the outputs of a locked image tower (shared by "
        "every model with that tower)",
    )
    r.add_argument("--report", action=argparse.BooleanOptionalAction, default=None, help="summary + charts")
    p.set_defaults(run=run)


def _entries(args: argparse.Namespace) -> dict:
    """The suite dict of a --dataset / legacy command line (validated by ``parse_suite``)."""
    from clipkit.evaluation.dataspec import split_spec

    pairs = [(args.task, d) for d in args.dataset]
    pairs += [("zeroshot", d) for d in args.zeroshot] + [("retrieval", d) for d in args.retrieval]
    names: list[str] = []
    datasets = []
    for task, spec in pairs:
        _, path, split = split_spec(spec)
        name = Path(path.rstrip("/")).stem + (f"_{split or args.split}" if (split or args.split) else "")
        name = name if name not in names else f"{name}_{task}"
        names.append(name)
        entry = {"name": name, "task": task, "path": spec, "alpha": args.alpha, "recall_k": args.recall_k}
        entry.update(split=args.split, format=args.format, train_split=args.train_split, seed=args.seed)
        entry.update(val_split=args.val_split, val_proportion=args.val_proportion, k_shot=args.k_shot)
        entry.update(holdout=args.holdout)
        entry.update({k: getattr(args, k) for k in ("classnames", "templates") if getattr(args, k)})
        datasets.append(entry)
    return {"name": args.task or "eval", "datasets": datasets}


def auto_threads(workers: int) -> int:
    """Idle cores (usable cores minus the 1-minute load average) shared by the processes of
    this machine (``LOCAL_WORLD_SIZE`` under torchrun), minus loader workers, at least 1: on
    a busy machine, fewer threads avoid the spinning that makes small matmuls 10x slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    idle = cores - os.getloadavg()[0] if hasattr(os, "getloadavg") else cores
    per_process = min(cores, int(idle + 0.5)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, per_process - workers)


def run(args: argparse.Namespace) -> int:
    import torch

    from clipkit.errors import ClipkitError
    from clipkit.evaluation.distributed import init_from_env
    from clipkit.evaluation.report import format_table
    from clipkit.evaluation.runner import RunOptions, run_suite
    from clipkit.evaluation.suite import load_suite, parse_suite
    from clipkit.models.embed import bf16_support, check_precision

    task = args.task or ("all" if args.suite else None)
    if task == "all" or args.suite:
        if task != "all" or not args.suite or args.dataset:
            raise ClipkitError("a suite runs as 'clipkit eval all --suite eval/<suite>.yaml' (no --dataset)")
        suite = load_suite(args.suite)
    elif task and not args.dataset:
        raise ClipkitError(
            f"clipkit eval {task}: give --dataset SPEC (or run a suite: clipkit eval all --suite ...)"
        )
    elif not task and not (args.zeroshot or args.retrieval):
        raise ClipkitError(
            "nothing to evaluate: give a task and --dataset, or 'all --suite eval/<suite>.yaml'"
        )
    else:
        suite = parse_suite(_entries(args), "command line")
    ranks, device = init_from_env(args.device)
    check_precision(args.precision, device)
    torch.set_num_threads(auto_threads(args.workers) if args.threads == "auto" else int(args.threads))
    report = args.report if args.report is not None else task == "all"
    opts = RunOptions(
        Path(args.output), args.batch_size, args.workers, device, Path(args.cache_dir), report, ranks
    )
    opts = dataclasses.replace(opts, precision=args.precision)
    log = print if ranks.main else (lambda _msg: None)
    bf16 = bf16_support(device)
    log(f"precision {args.precision}; native bf16 on {device}: {bf16 or 'no'}")
    rows = run_suite(args.model, suite, opts, log)
    if ranks.main:
        print(format_table([{k: r[k] for k in ("model", "dataset", "metric", "value")} for r in rows]))
        print(f"results written to {opts.output}")
    return 0
