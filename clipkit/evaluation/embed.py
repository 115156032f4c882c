"""Embedding a dataset with a DualEncoder: batching, device, eval mode.

The model is used only through the DualEncoder contract (ARCHITECTURE.md):
``image_transform(train=False)``, ``tokenize(list[str])``, ``encode_image(image=...)``
and ``encode_text(tokens)``. Embeddings are taken unnormalised and L2-normalised
here with ``F.normalize``, as CLIP_benchmark does with open_clip models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run in eval mode and inference mode; restore the train/eval state after."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train(True)


class _Transformed(torch.utils.data.IterableDataset):
    def __init__(self, samples: Iterable[dict[str, Any]], transform: Callable[[Any], torch.Tensor]):
        self.samples = samples
        self.transform = transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample in self.samples:
            yield {**sample, "image": self.transform(sample["image"])}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "key": [s["key"] for s in samples],
    }
    if "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)  # (B,)
    if "captions" in samples[0]:
        batch["captions"] = [list(s["captions"]) for s in samples]
    return batch


def image_batches(
    model: Any, dataset: Iterable[dict[str, Any]], batch_size: int, num_workers: int = 0
) -> Iterator[dict[str, Any]]:
    """Batches ``{"image" (B,3,H,W), "key", "label"? (B,), "captions"?}`` in dataset order."""
    transform = model.image_transform(train=False)
    loader = torch.utils.data.DataLoader(
        _Transformed(dataset, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    yield from loader


def encode_images(model: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D) L2-normalised image embeddings."""
    return F.normalize(model.encode_image(image=images.to(device), normalize=False), dim=-1)


def encode_texts(model: Any, texts: list[str], device: torch.device) -> torch.Tensor:
    """list of B strings -> (B, D) L2-normalised text embeddings."""
    return F.normalize(model.encode_text(model.tokenize(texts).to(device), normalize=False), dim=-1)
