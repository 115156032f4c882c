"""Embedding an evaluation dataset: its share on each rank, gathered back into reading order.

Batching, device, eval mode and the image transform are ``clipkit.models.embed``'s; this
module adds what evaluation needs on top: labels and captions kept beside the embeddings, a
dataset split across ranks (``EvalSource.shard``) and every rank receiving the whole result.
Images go through ``image_inference``: channels-last for a convolutional image side (fp32, the
same scores), bf16 autocast only with ``precision="bf16"``; on a CPU with several torch threads a
convolutional image side runs in lanes (``_image_rows``), with bit-identical embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipkit.evaluation.distributed import Ranks, all_gather
from clipkit.evaluation.source import EvalDataError
from clipkit.models.embed import (
    convolutional,
    encode_images,
    encode_texts,
    eval_mode,
    image_batches,
    image_inference,
    image_module,
    model_device,
)
from clipkit.models.inference import cpu_lanes, in_lanes


@dataclass
class Embedded:
    """A dataset's embeddings in reading order (the order of a single process without workers)."""

    image_emb: torch.Tensor  # (N, D) float32, L2-normalised
    keys: list[str]
    labels: torch.Tensor | None = None  # (N,) classification
    text_emb: torch.Tensor | None = None  # (Nt, D) retrieval: every caption, image by image
    text_to_image: torch.Tensor | None = None  # (Nt,) index of each caption's image


# Images per forward in each CPU lane (``clipkit.models.inference.in_lanes``): as the feature
# cache's fill, small batches keep a lane's activations in the CPU's caches, and >= 16 keeps oneDNN
# on its batch kernels, whose per-image outputs do not depend on the batch: the embeddings equal a
# one-pass run's bit for bit (tests/test_eval_lanes.py).
LANE_ROWS = 16


def _lane_chunks(
    batches: Iterable[dict[str, Any]], rows: int
) -> Iterable[tuple[dict[str, Any], int, torch.Tensor]]:
    """(batch, chunks of it left after this one, chunk of its images) for each batch: chunks of
    ``rows``, the last one taking the remainder (56 -> 16, 16, 24), so no chunk is shorter than
    ``rows`` unless the whole batch is."""
    for batch in batches:
        images = batch["image"]
        n_chunks = max(1, len(images) // rows)
        for i in range(n_chunks):
            end = (i + 1) * rows if i < n_chunks - 1 else len(images)
            yield batch, n_chunks - 1 - i, images[i * rows : end]


def image_rows(
    module: Any,
    batches: Iterable[dict[str, Any]],
    encode: Any,
    device: torch.device,
    precision: str = "fp32",
) -> Iterable[tuple[dict[str, Any], torch.Tensor]]:
    """(batch, ``encode(its images)``) in order. When ``module`` (what ``encode`` runs the images
    through) is convolutional and the device a CPU with several torch threads, ``LANE_ROWS``
    images per call run in one lane per thread, each call on one thread (bit-identical rows,
    more images/s); otherwise each batch runs whole. ``encode`` returns CPU tensors."""
    lanes = cpu_lanes(device) if module is not None and convolutional(module) else 1
    if lanes <= 1:
        for batch in batches:
            yield batch, encode(batch["image"])
        return
    done: list[torch.Tensor] = []
    for (batch, left, _), rows in in_lanes(
        lambda item: encode(item[2]), _lane_chunks(batches, LANE_ROWS), lanes, precision, device.type
    ):
        done.append(rows)
        if left == 0:
            yield batch, torch.cat(done)
            done = []


def _image_rows(
    model: Any, batches: Iterable[dict[str, Any]], prep: Any, device: torch.device, precision: str
) -> Iterable[tuple[dict[str, Any], torch.Tensor]]:
    """(batch, its image embeddings) in order, through ``image_rows`` (lanes for a CNN on a CPU)."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        return encode_images(model, prep(images), device).float().cpu()

    return image_rows(image_module(model), batches, encode, device, precision)


def _rank_part(
    model: Any,
    dataset: Iterable[dict[str, Any]],
    batch_size: int,
    num_workers: int,
    texts: bool,
    precision: str = "fp32",
) -> dict[str, Any]:
    device = model_device(model)
    part: dict[str, Any] = {"order": [], "keys": [], "labels": [], "images": [], "texts": [], "counts": []}
    with eval_mode(model), image_inference(model, precision) as prep:
        batches = image_batches(model, dataset, batch_size, num_workers)
        for batch, image_rows in _image_rows(model, batches, prep, device, precision):
            start = len(part["order"])
            part["order"] += [o if o is not None else (0, start + i) for i, o in enumerate(batch["order"])]
            part["keys"] += batch["key"]
            part["images"].append(image_rows)
            if "label" in batch:
                part["labels"].append(batch["label"])
            if texts:
                captions = [c for caps in batch["captions"] for c in caps]
                if captions:
                    part["texts"].append(encode_texts(model, captions, device).float().cpu())
                part["counts"] += [len(caps) for caps in batch["captions"]]
    return part


def _merge(parts: list[dict[str, Any]], texts: bool) -> Embedded:
    rows, labels, keys, counts, text_rows, order = [], [], [], [], [], []
    for part in parts:
        if not part["order"]:
            continue
        rows.append(torch.cat(part["images"]))
        keys += part["keys"]
        order += part["order"]
        if part["labels"]:
            labels.append(torch.cat(part["labels"]))
        if texts:
            counts += part["counts"]
            text_rows.append(torch.cat(part["texts"]) if part["texts"] else torch.zeros(0, rows[-1].shape[1]))
    if not rows:
        raise EvalDataError("yielded no samples")
    image_emb = torch.cat(rows)
    perm = sorted(range(len(order)), key=order.__getitem__)  # reading order
    out = Embedded(image_emb=image_emb[perm], keys=[keys[i] for i in perm])
    if labels:
        out.labels = torch.cat(labels)[perm]
    if texts:
        text_emb = torch.cat(text_rows)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
        idx = [s + t for i in perm for s in [starts[i]] for t in range(counts[i])]
        out.text_emb = text_emb[idx] if idx else text_emb[:0]
        out.text_to_image = torch.tensor(
            [new for new, i in enumerate(perm) for _ in range(counts[i])], dtype=torch.long
        )
    return out


def embed_dataset(
    model: Any,
    dataset: Iterable[dict[str, Any]],
    batch_size: int = 64,
    num_workers: int = 0,
    ranks: Ranks | None = None,
    texts: bool = False,
    precision: str = "fp32",
) -> Embedded:
    """Embed every image (and, with ``texts``, every caption) of ``dataset``.

    ``precision``: ``"fp32"`` or ``"bf16"`` (autocast; the caller checks it is native,
    ``clipkit.models.embed.check_precision``).

    With ``ranks.world`` > 1 each rank embeds its share (``dataset.shard``) and all ranks
    receive the gathered result. Raises ``EvalDataError`` naming ``dataset`` when it is empty.
    """
    ranks = ranks or Ranks()
    source = dataset
    if ranks.world > 1:
        if not hasattr(dataset, "shard"):
            raise TypeError(f"{dataset!r} cannot be split across ranks (it has no .shard(rank, world))")
        source = dataset.shard(ranks.rank, ranks.world)
    part = _rank_part(model, source, batch_size, num_workers, texts, precision)
    try:
        return _merge(all_gather(part, ranks), texts)
    except EvalDataError:
        raise EvalDataError(f"{dataset!r} yielded no samples: the dataset is empty") from None
