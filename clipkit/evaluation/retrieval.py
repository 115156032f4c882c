"""Zero-shot image<->text retrieval over images with one or more captions each.

As ``clip_benchmark/metrics/zeroshot_retrieval.py``: per image batch, the images and all
their captions are embedded (one ``encode_text`` call for the batch's captions), and each
caption remembers the index of its image; recall@k is then computed by
``metrics.retrieval_metrics`` (COCO / Flickr protocol).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from clipkit.evaluation.datasets import EvalDataError
from clipkit.evaluation.embed import encode_images, encode_texts, eval_mode, image_batches, model_device
from clipkit.evaluation.metrics import retrieval_metrics


def embed_retrieval(
    model: Any, dataset: Iterable[dict[str, Any]], batch_size: int = 128, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """image_emb (Ni, D), text_emb (Nt, D), text_to_image (Nt,), all on the CPU."""
    device = model_device(model)
    images, texts, text_to_image = [], [], []
    n_images = 0
    with eval_mode(model):
        for batch in image_batches(model, dataset, batch_size, num_workers):
            images.append(encode_images(model, batch["image"], device).float().cpu())
            captions = [c for caps in batch["captions"] for c in caps]
            if captions:
                texts.append(encode_texts(model, captions, device).float().cpu())
            text_to_image += [n_images + i for i, caps in enumerate(batch["captions"]) for _ in caps]
            n_images += len(batch["captions"])
    if not images:
        raise EvalDataError(f"{dataset!r} yielded no samples")
    if not texts:
        raise EvalDataError(f"{dataset!r} has images but no captions")
    return torch.cat(images), torch.cat(texts), torch.tensor(text_to_image, dtype=torch.long)


def evaluate_retrieval(
    model: Any,
    dataset: Iterable[dict[str, Any]],
    batch_size: int = 128,
    ks: Sequence[int] = (1, 5, 10),
    num_workers: int = 0,
) -> dict[str, float]:
    """``{"image_retrieval_recall@k", "text_retrieval_recall@k"}`` for each k.

    ``dataset`` yields ``{"image": PIL, "captions": list[str], "key"}``.
    """
    image_emb, text_emb, text_to_image = embed_retrieval(model, dataset, batch_size, num_workers)
    return retrieval_metrics(image_emb, text_emb, text_to_image, ks, block_size=batch_size)
