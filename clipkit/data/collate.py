"""Collation: prepared samples -> the batch dict of ARCHITECTURE.md ("Batch").

A prepared sample is ``{"key", "idx", "caption", "image" | "image_features"}`` (``"image"``
a (3, H, W) float tensor, or an (H, W, 3) uint8 array for the fast image plan). The batch::

    "image"  (B, 3, H, W) float   or  "image_features" (B, F) float32
                                  or  "image_activations" (B, *S) float32 (partial feature cache)
    "text"   (B, L) long          token ids
    "key"    list[str]
    "idx"    (B,) long            -1 for a sample without an idx member
    "source" list[int]            resampled training only: each sample's source (data.train_weights)

The loader adds its bookkeeping (``"skipped"``, in train mode ``"stream"``) after these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from clipkit.data.fast_transform import FastImage, empty_batch


def collate(
    samples: list[dict[str, Any]],
    tokenize: Callable[[list[str]], torch.Tensor],
    *,
    captions: list[str] | None = None,
    fast: FastImage | None = None,
) -> dict[str, Any]:
    """One batch of ``samples`` (at least one); ``captions`` replace the samples' own (e.g.
    augmented); ``fast``: the plan that made the samples' uint8 images, which finishes them."""
    if captions is None:
        captions = [s["caption"] for s in samples]
    text = torch.as_tensor(tokenize(captions)).long()  # (B, L)
    if text.ndim != 2 or text.shape[0] != len(samples):
        raise ValueError(f"tokenize must return (B, L) token ids, got shape {tuple(text.shape)}")
    batch: dict[str, Any] = {}
    cached = next((k for k in ("image_features", "image_activations") if k in samples[0]), None)
    if cached:  # (B, F) pooled tower outputs, or (B, *S) activations entering its unlocked top layers
        batch[cached] = torch.from_numpy(np.stack([s[cached] for s in samples]))
    elif fast is not None:
        batch["image"] = fast.collate([s["image"] for s in samples])  # (B, 3, H, W)
    else:
        images = [s["image"] for s in samples]
        out = empty_batch((len(images), *images[0].shape), images[0].dtype)
        batch["image"] = torch.stack(images, out=out)  # (B, 3, H, W)
    batch["text"] = text
    batch["key"] = [s["key"] for s in samples]
    batch["idx"] = torch.tensor([s["idx"] for s in samples], dtype=torch.long)  # (B,)
    if "source" in samples[0]:  # bookkeeping of a resampled stream (clipkit.data.resample)
        batch["source"] = [s["source"] for s in samples]
    return batch


def skip_carrier(skipped: dict[str, int]) -> dict[str, Any]:
    """A batch without samples that carries a worker's ``skipped`` counts (consumers skip it)."""
    return {"key": [], "idx": torch.empty(0, dtype=torch.long), "skipped": skipped}
