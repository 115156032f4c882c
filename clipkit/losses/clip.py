"""CLIP's symmetric softmax InfoNCE."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.losses.base import LOSSES, pair
from clipkit.losses.gather import gather_features, local_offset


@LOSSES.register("clip")
class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP (Radford et al., 2021, "Learning Transferable Visual
    Models From Natural Language Supervision").

    With ``s = logit_scale`` (already exp'd), L2-normalised pairs ``(x_i, y_i)`` of the
    global batch of N and ``z_ij = s x_i.y_j (+ logit_bias, which cancels)``::

        L_i2t = -1/N sum_i log softmax_j(z_ij)[j=i],   L_t2i = same with z transposed,
        L = (L_i2t + L_t2i) / 2

    ``label_smoothing`` eps replaces the one-hot target by ``(1-eps) onehot + eps/N``
    (Fini et al., 2023, "Improved baselines for vision-language pre-training").
    ``local_loss``: each rank scores only its own B rows against all N columns (memory
    O(B N) instead of O(N^2)); use it with ``gather_with_grad``. ``gather_with_grad``: see
    ``clipkit.losses.gather`` (true gives the exact global-batch gradient under DDP).
    Needs ``out["image_emb"], out["text_emb"], out["logit_scale"]``.
    Tiled (memory O(N D), same options): ``clip_tiled``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss 'clip': label_smoothing must be in [0, 1), got {label_smoothing}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.label_smoothing = label_smoothing

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "clip")
        all_img, all_txt = gather_features(img, txt, self.local_loss, self.gather_with_grad)
        if self.local_loss:
            logits_i2t = scale * img @ all_txt.T  # (B, N): local images vs all texts
            logits_t2i = scale * txt @ all_img.T  # (B, N)
            labels = torch.arange(img.shape[0], device=img.device) + local_offset(img.shape[0])
        else:
            logits_i2t = scale * all_img @ all_txt.T  # (N, N)
            logits_t2i = logits_i2t.T
            labels = torch.arange(all_img.shape[0], device=img.device)
        bias = out.get("logit_bias")
        if bias is not None:  # no effect on a softmax; kept so the bias stays in the graph
            logits_i2t, logits_t2i = logits_i2t + bias, logits_t2i + bias
        loss_i2t = F.cross_entropy(logits_i2t, labels, label_smoothing=self.label_smoothing)
        loss_t2i = F.cross_entropy(logits_t2i, labels, label_smoothing=self.label_smoothing)
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}
