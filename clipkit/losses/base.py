"""The loss registry and the few helpers every loss module shares.

``LOSSES`` is re-exported as ``clipkit.losses.LOSSES``; it lives here so that loss
modules can import it without a circular import through the package ``__init__``.
"""

from __future__ import annotations

from typing import Any

import torch

from clipkit.registry import Registry

LOSSES = Registry("loss")


def need(d: dict[str, Any] | None, key: str, loss: str, where: str, hint: str = "") -> Any:
    """``d[key]``, or a ``KeyError`` naming the loss, the missing key and how to provide it."""
    if d is None or d.get(key) is None:
        have = "no batch was passed" if d is None else f"it has: {', '.join(sorted(d)) or '(nothing)'}"
        raise KeyError(f"loss '{loss}' needs {where}['{key}'] but {have}. {hint}".rstrip())
    return d[key]


def pair(out: dict[str, Any], loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image_emb (B, D), text_emb (B, D), logit_scale)`` from a DualEncoder output."""
    img = need(out, "image_emb", loss, "out")
    txt = need(out, "text_emb", loss, "out")
    scale = need(out, "logit_scale", loss, "out")
    if img.shape != txt.shape or img.dim() != 2:
        raise ValueError(
            f"loss '{loss}': image_emb {tuple(img.shape)} and text_emb {tuple(txt.shape)} "
            "must both be (B, D) with the same B and D"
        )
    return img, txt, scale


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 -> fp32 (exp of logits at temperature 0.01 needs the range); else as is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sample_ids(batch: dict[str, Any] | None, loss: str, key: str = "idx", num_samples: int | None = None):
    """``batch[key]`` as a long tensor (B,), checked to be >= 0 (and < ``num_samples``)."""
    hint = (
        f"The data pipeline fills batch['{key}'] from each shard's '{key}' member; "
        "write shards with per-sample indices."
    )
    ids = need(batch, key, loss, "batch", hint)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point:
        raise TypeError(f"loss '{loss}': batch['{key}'] must be an integer tensor (B,), got {ids!r}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(
            f"loss '{loss}': batch['{key}'] holds {int(ids.min())} (-1 means the sample has no index). {hint}"
        )
    if num_samples is not None and ids.numel() and int(ids.max()) >= num_samples:
        raise ValueError(
            f"loss '{loss}': batch['{key}'] holds {int(ids.max())}, outside [0, num_samples={num_samples}); "
            "set the loss's num_samples to the dataset size"
        )
    return ids.long()
