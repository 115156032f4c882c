"""SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.losses.base import LOSSES, need, pair
from clipkit.losses.gather import all_gather_cat, local_offset


@LOSSES.register("siglip")
class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al., 2023, "Sigmoid Loss for Language
    Image Pre-Training").

    With ``z_ij = t x_i.y_j + b`` (``t = logit_scale`` already exp'd, ``b = logit_bias``),
    ``l_ij = +1`` for the matching pair and ``-1`` otherwise, over the rank's B images and
    all N texts of the global batch::

        L = -1/B sum_i sum_j log sigmoid(l_ij z_ij)

    (open_clip's normalisation: a sum over pairs divided by the local batch size).
    Distributed: every rank all-gathers the texts with gradient and scores its own
    images against them, which equals open_clip's ``dist_impl="gather"``; the ring
    (neighbour-exchange) variant is ``siglip_tiled(dist_impl="ring")``. Tiled (memory
    O(B D)): ``siglip_tiled``. Needs ``out["image_emb"],
    out["text_emb"], out["logit_scale"], out["logit_bias"]``.
    """

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "siglip")
        bias = need(out, "logit_bias", "siglip", "out", "Give the model a bias: model.init_logit_bias=-10.")
        all_txt = all_gather_cat(txt, with_grad=True)  # (N, D)
        logits = scale * img @ all_txt.T + bias  # (B, N)
        b = img.shape[0]
        labels = -torch.ones_like(logits)
        rows = torch.arange(b, device=img.device)
        labels[rows, local_offset(b) + rows] = 1.0  # the positives: this rank's own pairs
        loss = -F.logsigmoid(labels * logits).sum() / b
        return {"loss": loss}
