"""``clipkit eval --model RUN --zeroshot DIR --retrieval DIR``: CLIP_benchmark-format scores."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="zero-shot classification and image-text retrieval of a trained model",
        description="Datasets are folders in CLIP_benchmark's local webdataset layout "
        "(<dir>/test/*.tar, classnames.txt, zeroshot_classification_templates.txt; "
        "retrieval sets carry dataset_type.txt = retrieval). Use DIR:SPLIT for another split.",
    )
    p.add_argument("--model", required=True, help="a run folder or a checkpoint file written by clipkit train")
    p.add_argument("--zeroshot", action="append", default=[], metavar="DIR[:SPLIT]")
    p.add_argument("--retrieval", action="append", default=[], metavar="DIR[:SPLIT]")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--output", default=None, help="folder for result JSONs (default: the run folder)")
    p.set_defaults(run=run)


def _dataset(spec: str):
    from clipkit.evaluation.datasets import ClipBenchmarkWds

    root, _, split = spec.partition(":")
    return ClipBenchmarkWds(root, split=split or "test")


def run(args: argparse.Namespace) -> int:
    from clipkit.errors import ClipkitError
    from clipkit.evaluation.report import format_table, write_result
    from clipkit.evaluation.retrieval import evaluate_retrieval
    from clipkit.evaluation.zeroshot import evaluate_zeroshot
    from clipkit.training.load import load_trained

    if not args.zeroshot and not args.retrieval:
        raise ClipkitError("nothing to evaluate: give --zeroshot DIR and/or --retrieval DIR")
    model, cfg, ckpt = load_trained(args.model)
    out = Path(args.output) if args.output else ckpt.parent.parent
    rows = []
    for task, specs, fn in (
        ("zeroshot_classification", args.zeroshot, evaluate_zeroshot),
        ("zeroshot_retrieval", args.retrieval, evaluate_retrieval),
    ):
        for spec in specs:
            ds = _dataset(spec)
            metrics = fn(model, ds, args.batch_size)
            name = f"wds/{ds.name}"
            write_result(out / f"{ds.name}_{task}.json", name, str(args.model), str(ckpt), task, metrics)
            rows += [{"dataset": name, "metric": k, "value": v} for k, v in metrics.items()]
    print(format_table(rows))
    print(f"results written to {out}")
    return 0
