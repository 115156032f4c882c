"""Tiled versions of the softmax objectives whose only O(N^2) part is a logsumexp: DCL,
DCLW and CWCL. Same values, gradients and options as the dense losses, memory O(N D + tile^2).

Objectives of the zoo without a tiled version (the maths allows one; each docstring says
what it would take): ``clip_unif_align`` (its uniformity terms are logsumexps of squared
distances: the kernel would need row and column offsets), ``mv_infonce`` (its positives
are logsumexps over an instance's pairs), ``sogclr`` / ``isogclr`` (per-row temperatures
and moving-average weights inside the block).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.losses import tiled
from clipkit.losses.base import LOSSES, pair, upcast
from clipkit.losses.cwcl import CwclLoss
from clipkit.losses.gather import all_gather_cat, gather_features


@LOSSES.register("dcl_tiled")
class TiledDecoupledLoss(nn.Module):
    """``dcl`` without the (N, N) logits: the denominators without the positive,
    ``logsumexp_{j != i} z_ij``, are accumulated block by block (``tiled.softmax_xent`` with
    ``exclude_pos``). Same options as ``dcl`` plus ``tile_size`` / ``memory_budget_mb``
    (see ``clip_tiled``)."""

    def __init__(
        self,
        temperature: float | None = None,
        tile_size: int | None = None,
        memory_budget_mb: float = tiled.DEFAULT_MEMORY_BUDGET_MB,
    ):
        super().__init__()
        if temperature is not None and temperature <= 0:
            raise ValueError(f"loss '{self.registry_name}': temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.tile = tiled.choose_tile(4, memory_budget_mb, tile_size)

    def positive_weight(self, all_img: torch.Tensor, all_txt: torch.Tensor) -> torch.Tensor | None:
        """Weight of each positive logit (N,); None = 1 (folded into the kernel)."""
        return None

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, self.registry_name)
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D) each
        if x.shape[0] < 2:
            raise ValueError(
                "DCL needs at least 2 pairs in the (global) batch: with one there is no negative"
            )
        s = scale.to(x.dtype) if self.temperature is None else x.new_tensor(1.0 / self.temperature)
        w = self.positive_weight(x, y)
        xent = tiled.Xent(pos_offset=0, pos_weight=1.0 if w is None else 0.0, exclude_pos=True)
        rows, cols = tiled.softmax_xent(x, y, s, self.tile, xent=xent)  # (N,) each
        if w is not None:  # a weight with a gradient: the positive term outside the kernel, O(N D)
            pos = w * s * (x * y).sum(dim=1)
            rows, cols = rows - pos, cols - pos
        loss_i2t, loss_t2i = rows.mean(), cols.mean()
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


@LOSSES.register("dclw_tiled")
class TiledDecoupledWeightedLoss(TiledDecoupledLoss):
    """``dclw`` without the (N, N) logits (see ``dcl_tiled``); ``sigma`` as ``dclw``."""

    def __init__(
        self,
        temperature: float | None = None,
        sigma: float = 0.5,
        tile_size: int | None = None,
        memory_budget_mb: float = tiled.DEFAULT_MEMORY_BUDGET_MB,
    ):
        super().__init__(temperature, tile_size, memory_budget_mb)
        if sigma <= 0:
            raise ValueError(f"loss 'dclw_tiled': sigma must be > 0, got {sigma}")
        self.sigma = sigma

    def positive_weight(self, all_img: torch.Tensor, all_txt: torch.Tensor) -> torch.Tensor:
        pos = (all_img * all_txt).sum(dim=1)  # (N,) cosine of each positive pair
        return 2 - pos.shape[0] * torch.softmax(pos / self.sigma, dim=0)


@LOSSES.register("cwcl_tiled")
class TiledCwclLoss(CwclLoss):
    """``cwcl`` without the (N, N) logits and soft targets.

    The logsumexps come from ``tiled.softmax_xent``; the soft-target term needs no (N, N)
    matrix, since ``w_ij = u_i . u_j / 2 + 1/2`` is bilinear::

        sum_j w_ij z_ij = s x_i . ( (u_i @ (U^T Y)) / 2 + sum_j y_j / 2 ),
        sum_k w_ik     = u_i . sum_k u_k / 2 + N / 2

    with ``U`` (N, F) the normalised locked-tower features: O(N (D + F) + F D) memory. Same
    options and inputs as ``cwcl`` plus ``tile_size`` / ``memory_budget_mb``.
    """

    def __init__(
        self,
        targets_from: str = "image",
        tile_size: int | None = None,
        memory_budget_mb: float = tiled.DEFAULT_MEMORY_BUDGET_MB,
    ):
        super().__init__(targets_from)
        self.tile = tiled.choose_tile(4, memory_budget_mb, tile_size)

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "cwcl_tiled")
        feats = self.tower_features(out, batch).detach()
        if feats.dim() != 2 or feats.shape[0] != img.shape[0]:
            raise ValueError(
                f"loss 'cwcl_tiled': tower features {tuple(feats.shape)} must be (B={img.shape[0]}, F)"
            )
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D)
        u = F.normalize(all_gather_cat(feats, with_grad=False).to(x.dtype), dim=-1)  # (N, F)
        s, n = scale.to(x.dtype), x.shape[0]
        lse_rows, lse_cols = tiled.softmax_xent(x, y, s, self.tile, xent=tiled.Xent(pos_offset=None))
        w_sum = u @ u.sum(dim=0) / 2 + n / 2  # (N,) row sums of w (w is symmetric)
        soft_y = (u @ (u.T @ y) + y.sum(dim=0)) / 2  # (N, D): sum_j w_ij y_j
        soft_x = (u @ (u.T @ x) + x.sum(dim=0)) / 2  # (N, D): sum_i w_ji x_i
        loss_i2t = (lse_rows - s * (x * soft_y).sum(dim=1) / w_sum).mean()
        loss_t2i = (lse_cols - s * (y * soft_x).sum(dim=1) / w_sum).mean()
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}
