"""Decoupled contrastive loss (DCL) and its vMF-weighted variant (DCLW)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipkit.losses.base import LOSSES, pair, upcast
from clipkit.losses.gather import gather_features


def _decoupled(logits: torch.Tensor, pos_weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """mean_i [-w_i z_ii + log sum_{j != i} exp(z_ij)] for logits z (N, N), anchors on rows."""
    n = logits.shape[0]
    if n < 2:
        raise ValueError("DCL needs at least 2 pairs in the (global) batch: with one there is no negative")
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    negatives = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)  # (N,)
    return (-pos_weight * logits.diagonal() + negatives).mean()


@LOSSES.register("dcl")
class DecoupledLoss(nn.Module):
    """Decoupled contrastive loss (Yeh et al., 2022, "Decoupled Contrastive Learning"):
    InfoNCE with the positive removed from the denominator, applied across modalities.

    With ``s = logit_scale`` (or ``1 / temperature``) and ``z_ij = s x_i.y_j`` over the
    global batch of N pairs::

        L_i2t = 1/N sum_i [ -z_ii + log sum_{j != i} exp(z_ij) ],  L_t2i = same on z.T,
        L = (L_i2t + L_t2i) / 2

    Only cross-modal negatives are used (as in CLIP). The loss is unbounded below in
    ``s``: with the model's learned scale it rises to the model's clamp
    (``max_logit_scale``); the paper uses a fixed ``temperature`` (0.1 for SimCLR).
    Needs ``out["image_emb"], out["text_emb"], out["logit_scale"]`` (the scale only when
    ``temperature`` is None). Tiled (memory O(N D)): ``dcl_tiled``.
    """

    def __init__(self, temperature: float | None = None):
        super().__init__()
        if temperature is not None and temperature <= 0:
            raise ValueError(f"loss 'dcl': temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def positive_weight(self, all_img: torch.Tensor, all_txt: torch.Tensor) -> torch.Tensor | float:
        return 1.0

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, self.registry_name)
        all_img, all_txt = gather_features(upcast(img), upcast(txt))  # (N, D) each
        s = scale if self.temperature is None else 1.0 / self.temperature
        logits = s * all_img @ all_txt.T  # (N, N)
        w = self.positive_weight(all_img, all_txt)
        loss_i2t, loss_t2i = _decoupled(logits, w), _decoupled(logits.T, w)
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


@LOSSES.register("dclw")
class DecoupledWeightedLoss(DecoupledLoss):
    """DCLW (Yeh et al., 2022): DCL whose positive term ``-z_ii`` is weighted by the
    negative von Mises-Fisher weight of the positive pair::

        w_i = 2 - exp(x_i.y_i / sigma) / mean_k exp(x_k.y_k / sigma)      (mean_i w_i = 1)

    so that pairs already close (little signal) weigh less. As in the authors' code the
    weight is not detached. Same keys and ``temperature`` as ``dcl``; ``sigma`` = 0.5.
    Tiled (memory O(N D)): ``dclw_tiled``.
    """

    def __init__(self, temperature: float | None = None, sigma: float = 0.5):
        super().__init__(temperature)
        if sigma <= 0:
            raise ValueError(f"loss 'dclw': sigma must be > 0, got {sigma}")
        self.sigma = sigma

    def positive_weight(self, all_img: torch.Tensor, all_txt: torch.Tensor) -> torch.Tensor:
        pos = (all_img * all_txt).sum(dim=1)  # (N,) cosine of each positive pair
        return 2 - pos.shape[0] * torch.softmax(pos / self.sigma, dim=0)
