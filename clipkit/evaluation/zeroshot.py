"""Zero-shot classification: a classifier from class names x prompt templates.

As ``clip_benchmark/metrics/zeroshot_classification.py``: each class weight is the mean
of its L2-normalised template embeddings, renormalised; logits are
``100 * normalize(image_emb) @ weights`` (a fixed scale, not the model's own
``logit_scale``). Text is encoded one class at a time, images in ``batch_size`` batches,
so a run with CLIP_benchmark's batch size sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from clipkit.evaluation.datasets import EvalDataError, check_templates
from clipkit.evaluation.embed import encode_images, encode_texts, eval_mode, image_batches, model_device
from clipkit.evaluation.metrics import zeroshot_metrics

LOGIT_SCALE = 100.0  # CLIP_benchmark's fixed zero-shot logit scale


def build_classifier(
    model: Any, classnames: list[str], templates: list[str], batch_size: int = 128
) -> torch.Tensor:
    """(C, D) unit-norm class weights, in ``classnames`` order."""
    check_templates(templates)
    if not classnames:
        raise EvalDataError("no class names to build a zero-shot classifier from")
    device = model_device(model)
    weights = []
    with eval_mode(model):
        for name in classnames:
            texts = [t.format(c=name) for t in templates]
            emb = torch.cat(
                [
                    encode_texts(model, texts[i : i + batch_size], device)
                    for i in range(0, len(texts), batch_size)
                ]
            )  # (T, D), each row unit norm
            mean = emb.mean(dim=0)
            weights.append(mean / mean.norm())
    return torch.stack(weights)  # (C, D)


def zeroshot_logits(
    model: Any,
    dataset: Iterable[dict[str, Any]],
    classifier: torch.Tensor,
    batch_size: int = 128,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) = 100 * image_emb @ classifier.T and labels (N,), on the CPU."""
    device = model_device(model)
    # (D, C) contiguous, the layout of CLIP_benchmark's `torch.stack(weights, dim=1)`.
    weights = classifier.to(device).T.contiguous()
    logits, labels = [], []
    with eval_mode(model):
        for batch in image_batches(model, dataset, batch_size, num_workers):
            image_emb = encode_images(model, batch["image"], device)  # (B, D)
            logits.append((LOGIT_SCALE * image_emb @ weights).float().cpu())  # (B, C)
            labels.append(batch["label"])
    if not logits:
        raise EvalDataError(f"{dataset!r} yielded no samples")
    return torch.cat(logits), torch.cat(labels)


def evaluate_zeroshot(
    model: Any,
    dataset: Any,
    batch_size: int = 128,
    num_workers: int = 0,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
) -> dict[str, float]:
    """``{"acc1", "acc5"?, "mean_per_class_recall"}`` of ``model`` on ``dataset``.

    ``dataset`` yields ``{"image": PIL, "label": int, "key"}``; class names and templates
    default to its ``.classnames`` and ``.templates`` (e.g. a ``ClipBenchmarkWds``).
    """
    classnames = dataset.classnames if classnames is None else classnames
    templates = dataset.templates if templates is None else templates
    classifier = build_classifier(model, classnames, templates, batch_size)
    logits, labels = zeroshot_logits(model, dataset, classifier, batch_size, num_workers)
    if labels.max() >= len(classnames) or labels.min() < 0:
        bad = labels[(labels < 0) | (labels >= len(classnames))][0].item()
        raise EvalDataError(f"{dataset!r} has label {bad} but {len(classnames)} class names")
    return zeroshot_metrics(logits, labels)
