"""Zero-shot classification: a classifier from class names x prompt templates, searched with FAISS.

As ``clip_benchmark/metrics/zeroshot_classification.py``: each class weight is the mean
of its L2-normalised template embeddings, renormalised; an image's scores are
``normalize(image_emb) @ weights`` (CLIP_benchmark multiplies by a fixed 100, which does
not change any ranking). The class weights are put in an exact inner-product FAISS index
(``IndexFlatIP``) and every image's top-5 classes come from one search.

Faster than CLIP_benchmark without changing its numbers: the C x T prompts are encoded in
``batch_size`` batches instead of one call per class (each prompt's embedding does not
depend on its batch), and images are embedded once, in inference mode.

Templates are a list of prompts with ``{c}``, or a dict ``{class name: [prompts]}`` of
class-specific prompts (CuPL style), as CLIP_benchmark accepts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from clipkit.evaluation.datasets import check_templates
from clipkit.evaluation.distributed import Ranks, all_gather
from clipkit.evaluation.embed import Embedded, embed_dataset
from clipkit.evaluation.metrics import faiss_topk, zeroshot_metrics_from_topk
from clipkit.evaluation.source import EvalDataError
from clipkit.models.embed import encode_texts, eval_mode, model_device

LOGIT_SCALE = 100.0  # CLIP_benchmark's fixed zero-shot logit scale


def class_prompts(classnames: list[str], templates: list[str] | dict[str, list[str]]) -> list[list[str]]:
    """The prompts of each class, in ``classnames`` order."""
    if not classnames:
        raise EvalDataError("no class names to build a zero-shot classifier from")
    if isinstance(templates, dict):
        missing = [c for c in classnames if not templates.get(c)]
        if missing:
            raise EvalDataError(
                f"class-specific templates lack prompts for {len(missing)} classes, e.g. {missing[:3]}"
            )
        return [list(templates[c]) for c in classnames]
    check_templates(list(templates))
    return [[t.format(c=name) for t in templates] for name in classnames]


def build_classifier(
    model: Any,
    classnames: list[str],
    templates: list[str] | dict[str, list[str]],
    batch_size: int = 128,
    ranks: Ranks | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """(C, D) unit-norm class weights, in ``classnames`` order.

    With several ranks, each encodes every world-th batch of prompts and all gather them.
    ``precision="bf16"`` encodes the prompts under bf16 autocast.
    """
    ranks = ranks or Ranks()
    prompts = class_prompts(classnames, templates)
    flat = [p for ps in prompts for p in ps]
    device = model_device(model)
    starts = list(range(0, len(flat), batch_size))
    mine = {}
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with eval_mode(model), bf16:
        for b, s in enumerate(starts):
            if b % ranks.world == ranks.rank:
                mine[s] = encode_texts(model, flat[s : s + batch_size], device).float().cpu()
    parts = {s: emb for part in all_gather(mine, ranks) for s, emb in part.items()}
    emb = torch.cat([parts[s] for s in starts])  # (C*T, D), rows unit norm
    weights, at = [], 0
    for ps in prompts:
        mean = emb[at : at + len(ps)].mean(dim=0)
        weights.append(mean / mean.norm())
        at += len(ps)
    return torch.stack(weights)  # (C, D)


@dataclass
class ZeroShotResult:
    metrics: dict[str, float]
    labels: torch.Tensor  # (N,)
    topk: torch.Tensor  # (N, k) class indices, best first (k = min(5, C))
    classnames: list[str]
    keys: list[str]
    classifier: torch.Tensor | None = None  # (C, D) the class weights used

    @property
    def pred(self) -> torch.Tensor:
        return self.topk[:, 0]


def _check_labels(labels: torch.Tensor, classnames: list[str], dataset: Any) -> None:
    bad = labels[(labels < 0) | (labels >= len(classnames))]
    if len(bad):
        raise EvalDataError(f"{dataset!r} has label {bad[0].item()} but {len(classnames)} class names")


def run_zeroshot(
    model: Any,
    dataset: Any,
    batch_size: int = 64,
    num_workers: int = 0,
    classnames: list[str] | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
    ranks: Ranks | None = None,
    embedded: Embedded | None = None,
    classifier: torch.Tensor | None = None,
    precision: str = "fp32",
) -> ZeroShotResult:
    """Metrics and predictions of ``model`` on ``dataset`` (every rank gets the whole result).

    ``embedded``: the dataset's image embeddings when already computed (e.g. another prompt set);
    ``classifier``: the (C, D) class weights of these class names and prompts when already built
    (``build_classifier``; e.g. another dataset with the same classes).
    """
    classnames = dataset.classnames if classnames is None else classnames
    templates = dataset.templates if templates is None else templates
    if classifier is None:
        classifier = build_classifier(model, classnames, templates, batch_size, ranks, precision)
    emb = embedded or embed_dataset(model, dataset, batch_size, num_workers, ranks, precision=precision)
    if emb.labels is None:
        raise EvalDataError(f"{dataset!r} has no labels: it is not a classification dataset")
    _check_labels(emb.labels, classnames, dataset)
    _, topk = faiss_topk(emb.image_emb, classifier, 5)  # (N, min(5, C)), exact inner product
    metrics = zeroshot_metrics_from_topk(topk, emb.labels, len(classnames))
    return ZeroShotResult(metrics, emb.labels, topk, list(classnames), emb.keys, classifier)


def evaluate_zeroshot(
    model: Any,
    dataset: Any,
    batch_size: int = 128,
    num_workers: int = 0,
    classnames: list[str] | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """``{"acc1", "acc5"?, "mean_per_class_recall"}`` of ``model`` on ``dataset``.

    ``dataset`` yields ``{"image": PIL, "label": int, "key"}``; class names and templates
    default to its ``.classnames`` and ``.templates`` (e.g. a ``ClipBenchmarkWds``).
    """
    return run_zeroshot(model, dataset, batch_size, num_workers, classnames, templates, ranks).metrics


def zeroshot_logits(
    model: Any,
    dataset: Iterable[dict[str, Any]],
    classifier: torch.Tensor,
    batch_size: int = 128,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) = 100 * image_emb @ classifier.T and labels (N,), CLIP_benchmark's way."""
    emb = embed_dataset(model, dataset, batch_size, num_workers)
    # (D, C) contiguous, the layout of CLIP_benchmark's `torch.stack(weights, dim=1)`.
    weights = classifier.T.contiguous()
    return LOGIT_SCALE * emb.image_emb @ weights, emb.labels
