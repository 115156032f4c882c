"""Zero-shot image<->text retrieval over images with one or more captions each.

As ``clip_benchmark/metrics/zeroshot_retrieval.py``: per image batch, the images and all
their captions are embedded (one ``encode_text`` call for the batch's captions), and each
caption remembers the index of its image; recall@k is then computed by
``metrics.retrieval_metrics`` (COCO / Flickr protocol: image->text is a hit when any of
the image's captions is in the top k).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from clipkit.evaluation.distributed import Ranks
from clipkit.evaluation.embed import embed_dataset
from clipkit.evaluation.metrics import retrieval_metrics
from clipkit.evaluation.source import EvalDataError


def embed_retrieval(
    model: Any,
    dataset: Iterable[dict[str, Any]],
    batch_size: int = 128,
    num_workers: int = 0,
    ranks: Ranks | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """image_emb (Ni, D), text_emb (Nt, D), text_to_image (Nt,), all on the CPU, reading order."""
    emb = embed_dataset(model, dataset, batch_size, num_workers, ranks, texts=True, precision=precision)
    if emb.text_emb is None or len(emb.text_emb) == 0:
        raise EvalDataError(f"{dataset!r} has images but no captions")
    return emb.image_emb, emb.text_emb, emb.text_to_image


def evaluate_retrieval(
    model: Any,
    dataset: Iterable[dict[str, Any]],
    batch_size: int = 128,
    ks: Sequence[int] = (1, 5, 10),
    num_workers: int = 0,
    ranks: Ranks | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """``{"image_retrieval_recall@k", "text_retrieval_recall@k"}`` for each k.

    ``dataset`` yields ``{"image": PIL, "captions": list[str], "key"}``.
    """
    image_emb, text_emb, text_to_image = embed_retrieval(
        model, dataset, batch_size, num_workers, ranks, precision
    )
    return retrieval_metrics(image_emb, text_emb, text_to_image, ks, block_size=max(batch_size, 256))
