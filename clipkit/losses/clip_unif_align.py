"""CLIP plus explicit uniformity and alignment terms (closing the contrastive gap)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.losses.base import LOSSES, pair, upcast
from clipkit.losses.gather import gather_features
from clipkit.losses.stats import alignment, cross_uniformity, uniformity


@LOSSES.register("clip_unif_align")
class ClipUniformAlignLoss(nn.Module):
    """CLIP + uniformity + alignment (Fahim et al., 2024, "It's Not a Modality Gap:
    Characterizing and Addressing the Contrastive Gap"; terms of Wang & Isola, 2020).

    Over the global batch of N pairs (see ``clipkit.losses.stats``)::

        L = L_clip + align_weight * mean_i ||x_i - y_i||^2
                   + uniform_weight * (uniform(x) + uniform(y)) / 2
                   + cross_uniform_weight * xuniform(x, y)

    ``uniform(x) = log mean_{i != j} exp(-t ||x_i - x_j||^2)``. The paper's L_CUA is the
    default weights (1, 1, 0); its L_CUAXU adds the cross-modal term (weight 1).
    ``L_clip`` is ``clip`` without local loss. Needs ``out["image_emb"], out["text_emb"],
    out["logit_scale"]``.

    Tiling: no tiled version yet (memory O(N^2)). The maths allows one: ``L_clip`` is
    ``clip_tiled``'s and each uniformity term is a logsumexp over pairs of
    ``-t ||x_i - x_j||^2 = 2t x_i.x_j - t|x_i|^2 - t|x_j|^2``, which needs the kernel of
    ``clipkit.losses.tiled`` to take row and column offsets (and their gradients).
    Gradient caching (``train.grad_cache_micro_batch``) works as for any loss.
    """

    def __init__(
        self,
        align_weight: float = 1.0,
        uniform_weight: float = 1.0,
        cross_uniform_weight: float = 0.0,
        t: float = 2.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.align_weight, self.uniform_weight = align_weight, uniform_weight
        self.cross_uniform_weight, self.t = cross_uniform_weight, t
        self.label_smoothing = label_smoothing

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "clip_unif_align")
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D)
        logits = scale * x @ y.T  # (N, N)
        labels = torch.arange(x.shape[0], device=x.device)
        clip = (
            F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=self.label_smoothing)
        ) / 2
        align = alignment(x, y)
        uniform = (uniformity(x, self.t) + uniformity(y, self.t)) / 2
        loss = clip + self.align_weight * align + self.uniform_weight * uniform
        parts = {"loss_clip": clip, "align": align, "uniform": uniform}
        if self.cross_uniform_weight:
            parts["cross_uniform"] = cross_uniformity(x, y, self.t)
            loss = loss + self.cross_uniform_weight * parts["cross_uniform"]
        return {"loss": loss, **parts}
