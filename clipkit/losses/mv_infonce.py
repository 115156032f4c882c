"""Multi-view InfoNCE over images with several captions."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.losses.base import LOSSES, pair, sample_ids, upcast
from clipkit.losses.gather import all_gather_cat, gather_features


@LOSSES.register("mv_infonce")
class MultiViewInfoNceLoss(nn.Module):
    """MV-InfoNCE (Koromilas et al., 2025, "A Principled Framework for Multi-View
    Contrastive Learning"), cross-modal: one term per instance that aligns all its views.

    Input convention: each row of the batch is one (image, caption) pair; rows whose
    ``batch[group_key]`` (default ``"idx"``, the dataset sample index) are equal are views
    of the same instance, e.g. one image repeated with each of its K captions. With
    ``z_rc = s x_r.y_c`` over the global batch and G an instance (set of rows)::

        L_G = -log( 2 sum_{r in G, c in G} exp(z_rc)
                    / [ sum_{r in G} sum_c exp(z_rc) + sum_{c in G} sum_r exp(z_rc) ] )
        L   = mean over the instances G of the batch

    Positives are every image-caption pair of the instance, counted in both directions
    (the paper's sum over ordered view pairs); the energy holds every cross-modal
    interaction of the instance's views, positives included, as in the paper. Only
    image-text interactions are scored (like CLIP); with one row per instance this is
    ``-log(2 e^{z_ii} / (sum_c e^{z_ic} + sum_r e^{z_ri}))``. Needs ``out["image_emb"],
    out["text_emb"], out["logit_scale"]`` and ``batch[group_key]`` (ids >= 0).
    """

    def __init__(self, group_key: str = "idx"):
        super().__init__()
        self.group_key = group_key

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "mv_infonce")
        ids = sample_ids(batch, "mv_infonce", key=self.group_key).to(img.device)
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D)
        groups = all_gather_cat(ids, with_grad=False)  # (N,)
        logits = scale * x @ y.T  # (N, N): image rows, text columns
        _, member = torch.unique(groups, return_inverse=True)
        inside = F.one_hot(member).T.bool()  # (G, N): row r belongs to instance G
        same = member[:, None] == member[None, :]  # (N, N): r, c in one instance
        # log sum over the instance's image-caption pairs, via per-image-row partial sums
        pos_rows = torch.logsumexp(logits.masked_fill(~same, -math.inf), dim=1)  # (N,)
        pos = _masked_lse(pos_rows, inside)  # (G,)
        # energy: all interactions of the instance's images (rows) and captions (columns)
        energy = _masked_lse(
            torch.cat([logits.logsumexp(dim=1), logits.logsumexp(dim=0)]), inside.repeat(1, 2)
        )
        per_instance = -(math.log(2.0) + pos - energy)  # (G,)
        return {"loss": per_instance.mean(), "instances": torch.tensor(float(per_instance.shape[0]), device=logits.device)}


def _masked_lse(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(G,) log sum_{k: mask[g, k]} exp(values[k])."""
    return torch.logsumexp(values[None, :].masked_fill(~mask, -math.inf), dim=1)
