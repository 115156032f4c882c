"""Run a suite: every model on every dataset; result JSONs, a summary table and charts.

Output folder layout::

    <output>/<model>/<dataset>_<task>.json   one per (model, dataset), CLIP_benchmark's format
    <output>/summary.csv, summary.md          one row per (dataset, task, metric), a column per model
    <output>/scores.png                       headline scores, grouped by dataset
    <output>/confusion/<model>/<dataset>.png  one per zero-shot dataset

``<model>`` is ``safe_name(model spec)``. All datasets are opened (and their class names and
prompts checked) before the first model is loaded, so a bad suite fails in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.evaluation.distributed import Ranks
from clipkit.evaluation.source import EvalDataError, KeyFilter
from clipkit.evaluation.suite import Suite, SuiteEntry

SHORT_TASK = {
    "zeroshot_classification": "zeroshot",
    "zeroshot_retrieval": "retrieval",
    "linear_probe": "linear_probe",
}
DATASET_TASK = {
    "zeroshot_classification": "zeroshot_classification",
    "zeroshot_retrieval": "zeroshot_retrieval",
}


@dataclass(frozen=True)
class RunOptions:
    output: Path
    batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"
    # Linear-probe features, and the locked image tower's outputs (evaluation/tower_cache.py).
    cache_dir: Path | None = None
    # Summary table, bar chart and confusion matrices (the JSONs are always written).
    report: bool = True
    ranks: Ranks = field(default_factory=Ranks)
    # "fp32" (default: scores identical to CLIP_benchmark's) or "bf16" autocast where native.
    precision: str = "fp32"


@dataclass
class Prepared:
    entry: SuiteEntry
    data: dict[str, Any]  # "test" (+ "train", "val" for a linear probe)
    classnames: list[str] | None = None
    templates: Any = None


def _open(entry: SuiteEntry, split: str | None) -> Any:
    from clipkit.evaluation.dataspec import open_dataset

    return open_dataset(
        entry.path, split=split or None, alpha=entry.alpha, fmt=entry.format or None, name=entry.name
    )


def prepare(entry: SuiteEntry) -> Prepared:
    """Open ``entry``'s dataset(s) and check they fit its task; resolve class names and prompts."""
    where = f"dataset '{entry.name}' ({entry.path})"
    if entry.task == "linear_probe":
        if entry.holdout:
            full = _open(entry, entry.split)
            data = {
                "train": full.filtered(KeyFilter(entry.holdout, entry.seed, complement=True)),
                "test": full.filtered(KeyFilter(entry.holdout, entry.seed)),
            }
        else:
            data = {"train": _open(entry, entry.train_split), "test": _open(entry, entry.split)}
        if entry.val_split:
            data["val"] = _open(entry, entry.val_split)
        for ds in data.values():
            if ds.task != "zeroshot_classification":
                raise EvalDataError(
                    f"{where}: a linear probe needs labelled images, but it is a retrieval set"
                )
        return Prepared(entry, data)
    ds = _open(entry, entry.split)
    if ds.task != DATASET_TASK[entry.task]:
        have = "retrieval (captions)" if ds.task == "zeroshot_retrieval" else "classification (labels)"
        raise EvalDataError(f"{where} is a {have} dataset; it cannot be evaluated as {entry.task}")
    prep = Prepared(entry, {"test": ds})
    if entry.task == "zeroshot_classification":
        prep.classnames = list(entry.classnames) if entry.classnames else ds.classnames
        prep.templates = entry.templates if entry.templates else ds.templates
    return prep


def run_entry(
    model: Any, prep: Prepared, opts: RunOptions, images: dict[str, Any] | None = None
) -> tuple[dict[str, float], Any]:
    """(metrics, zero-shot result or None) of ``model`` on one prepared dataset.

    ``images`` memoises image embeddings by dataset fingerprint, so zero-shot entries that
    share a dataset (prompt ablations) embed its images once, and the class weights of each
    (class names, prompts), so datasets that share them encode their prompts once. With
    ``opts.cache_dir``, a model whose image tower is locked reads that tower's outputs from disk
    (``clipkit.evaluation.tower_cache``, fp32 only): the suite's models share one image pass.
    """
    e, bs, nw, ranks, precision = prep.entry, opts.batch_size, opts.num_workers, opts.ranks, opts.precision
    if e.task != "linear_probe" and ranks.world == 1 and precision == "fp32":  # a locked tower: from disk
        from clipkit.evaluation.tower_cache import cached_view

        model, ds, _ = cached_view(model, prep.data["test"], opts.cache_dir, bs, nw)
        if ds is not prep.data["test"]:
            prep, images = Prepared(e, {"test": ds}, prep.classnames, prep.templates), None
    if e.task == "zeroshot_classification":
        from clipkit.evaluation.embed import embed_dataset
        from clipkit.evaluation.zeroshot import run_zeroshot

        ds = prep.data["test"]
        key = ds.fingerprint() if images is not None and hasattr(ds, "fingerprint") else None
        if key is not None and key not in images:
            images[key] = embed_dataset(model, ds, bs, nw, ranks, precision=precision)
        embedded = images[key] if key is not None else None
        names = prep.classnames if prep.classnames is not None else ds.classnames
        prompts = prep.templates if prep.templates is not None else ds.templates
        text_key = ("classifier", repr(names), repr(prompts))  # the class weights of these prompts
        classifier = images.get(text_key) if images is not None else None
        res = run_zeroshot(
            model, ds, bs, nw, prep.classnames, prep.templates, ranks, embedded, classifier, precision
        )
        if images is not None:
            images[text_key] = res.classifier
        return res.metrics, res
    if e.task == "zeroshot_retrieval":
        from clipkit.evaluation.retrieval import evaluate_retrieval

        metrics = evaluate_retrieval(model, prep.data["test"], bs, e.recall_k, nw, ranks, precision)
        return metrics, None
    from clipkit.evaluation.linear_probe import evaluate_linear_probe

    metrics = evaluate_linear_probe(
        model,
        prep.data["train"],
        prep.data["test"],
        prep.data.get("val"),
        e.val_proportion,
        e.k_shot,
        e.seed,
        opts.cache_dir,
        bs,
        nw,
        ranks,
    )
    return metrics, None


def dataset_label(prep: Prepared) -> str:
    """CLIP_benchmark's "dataset" field: ``wds/<name>`` for its own layout."""
    from clipkit.evaluation.datasets import ClipBenchmarkWds

    return f"wds/{prep.entry.name}" if isinstance(prep.data["test"], ClipBenchmarkWds) else prep.entry.name


def _headline(metrics: dict[str, float]) -> str:
    keys = ("acc1", "lp_acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def run_suite(
    model_specs: list[str], suite: Suite, opts: RunOptions, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Evaluate every model on every dataset of ``suite``; returns the long result rows."""
    from clipkit.evaluation.report import write_result
    from clipkit.models.specs import load_model, safe_name

    prepared = [prepare(e) for e in suite.entries]  # fail before any model is loaded
    out, main = Path(opts.output), opts.ranks.main
    rows: list[dict[str, Any]] = []
    confusions: list[tuple[str, str, Any]] = []
    for spec in model_specs:
        t_model = time.perf_counter()
        model = load_model(spec, device=opts.device)
        if main:
            log(f"{spec}: loaded in {time.perf_counter() - t_model:.1f} s")
        images: dict[str, Any] = {}
        for prep in prepared:
            t0 = time.perf_counter()
            metrics, res = run_entry(model, prep, opts, images)
            task = prep.entry.task
            if main:
                path = out / safe_name(spec) / f"{safe_name(prep.entry.name)}_{SHORT_TASK[task]}.json"
                write_result(path, dataset_label(prep), model.name, model.pretrained, task, metrics)
                log(
                    f"  {prep.entry.name} ({SHORT_TASK[task]}): {_headline(metrics)}  [{time.perf_counter() - t0:.1f} s]"
                )
            if res is not None:
                confusions.append((spec, prep.entry.name, res))
            rows += [
                {"model": spec, "dataset": prep.entry.name, "task": task, "metric": k, "value": float(v)}
                for k, v in metrics.items()
            ]
        del model
    if main and opts.report:
        write_report(rows, confusions, out, suite.name)
    return rows


def write_report(
    rows: list[dict[str, Any]], confusions: list[tuple[str, str, Any]], out: Path, title: str
) -> None:
    from clipkit.evaluation.plots import bar_chart, confusion_png
    from clipkit.evaluation.report import write_summary
    from clipkit.models.specs import safe_name

    write_summary(rows, out)
    bar_chart(rows, out / "scores.png", title)
    for spec, name, res in confusions:
        acc = res.metrics["acc1"]
        confusion_png(
            res.labels.numpy(),
            res.pred.numpy(),
            res.classnames,
            out / "confusion" / safe_name(spec) / f"{safe_name(name)}.png",
            f"{name}: {spec}\ntop-1 {acc:.4f}",
        )
