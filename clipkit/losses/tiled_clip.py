"""CLIP's symmetric InfoNCE computed in tiles: memory O(N tile) -> O(tile^2 + N D)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipkit.losses import tiled
from clipkit.losses.base import LOSSES, pair, upcast
from clipkit.losses.gather import gather_features, local_offset


@LOSSES.register("clip_tiled")
class TiledClipLoss(nn.Module):
    """``clip`` (same value, same gradients, same options) without the (N, N) logits.

    The logsumexp over each row (image -> texts) and each column (text -> images) of
    ``z = s x @ y.T`` is accumulated block by block, with the positive logit and the label
    smoothing term (``clipkit.losses.tiled.softmax_xent``)::

        L_i2t = mean_i [ logsumexp_j z_ij - (1 - eps) z_ii - eps mean_j z_ij ]

    and ``L_t2i`` the same on ``z.T``; the backward recomputes each block's softmax instead
    of storing it. Beyond the embeddings and their gradients the loss needs about
    ``4 tile^2`` floats (and O(N) vectors).

    A separate registered name rather than a flag on ``clip`` because it is a different
    implementation with its own options and limits (no double backward, one extra matmul
    per block against ``clip``'s dense backward), chosen per recipe:
    ``loss.name=clip_tiled``. Options as ``clip``, plus ``tile_size`` (side of the square
    logit block; None = the largest that fits ``memory_budget_mb``, see
    ``tiled.choose_tile``). Computed in float32 for fp16 / bf16 embeddings. Needs
    ``out["image_emb"], out["text_emb"], out["logit_scale"]``; ``out["logit_bias"]``
    cancels in a softmax (it gets a zero gradient).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        label_smoothing: float = 0.0,
        tile_size: int | None = None,
        memory_budget_mb: float = tiled.DEFAULT_MEMORY_BUDGET_MB,
    ):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss 'clip_tiled': label_smoothing must be in [0, 1), got {label_smoothing}")
        self.tile = tiled.choose_tile(4, memory_budget_mb, tile_size)  # float32 blocks
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.label_smoothing = label_smoothing

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "clip_tiled")
        img, txt = upcast(img), upcast(txt)
        s = scale.to(img.dtype)
        all_img, all_txt = gather_features(img, txt, self.local_loss, self.gather_with_grad)  # (N, D)
        eps = self.label_smoothing
        if self.local_loss:  # this rank's B rows against all N columns, in both directions
            xent = tiled.Xent(pos_offset=local_offset(img.shape[0]), pos_weight=1 - eps, smoothing=eps)
            rows = [
                tiled.softmax_xent(a, b, s, self.tile, cols=False, xent=xent)[0]
                for a, b in ((img, all_txt), (txt, all_img))
            ]
        else:  # rows and columns of the one (N, N) matrix in one pass
            xent = tiled.Xent(pos_offset=0, pos_weight=1 - eps, smoothing=eps)
            rows = tiled.softmax_xent(all_img, all_txt, s, self.tile, xent=xent)
        losses = [r.mean() for r in rows]
        loss_i2t, loss_t2i = losses
        loss = (loss_i2t + loss_t2i) / 2
        bias = out.get("logit_bias")
        if bias is not None:  # no effect on a softmax; kept so the bias stays in the graph
            loss = loss + 0.0 * bias
        return {"loss": loss, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}
