"""SigLIP's pairwise sigmoid loss computed in tiles, gathered or passed around the ring."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from clipkit.losses import tiled
from clipkit.losses.base import LOSSES, need, pair, upcast
from clipkit.losses.gather import all_gather_cat, local_offset


@LOSSES.register("siglip_tiled")
class TiledSigLipLoss(nn.Module):
    """``siglip`` (same value and gradients) without the (B, N) logits and labels.

    ``L = -1/B sum_i sum_j log sigmoid(l_ij z_ij)`` is summed block by block
    (``clipkit.losses.tiled.sigmoid_pairs``); the backward recomputes each block's sigmoid.
    The loss needs, beyond the embeddings (and their gradients), about ``2-4 tile^2``
    floats. A separate registered name rather than a flag on ``siglip``: see
    ``clip_tiled``.

    ``dist_impl`` (only matters when ``world_size > 1``):

    - ``"gather"``: all-gather the texts with gradient and score the local images against
      all N (as ``siglip``); the gathered (N, D) texts and their gradient grow with the
      number of ranks.
    - ``"ring"``: neighbour exchange (open_clip's ``dist_impl="shift"``, without its
      autograd graph of every received block): the text blocks travel the ring in forward
      and again, with their accumulated gradients, in backward. Each rank holds at most one
      foreign (B, D) block and its gradient, so memory stays constant as ranks are added;
      the price is 2 (W - 1) + 1 point-to-point hops of (B, D) in backward.

    Both give each rank the gradient of its own loss, whose mean over ranks is the
    single-process loss over the concatenated batch (as ``siglip``; DDP's averaging then
    reproduces the single-process gradient). ``tile_size`` / ``memory_budget_mb`` as
    ``clip_tiled``. Needs ``out["image_emb"], out["text_emb"], out["logit_scale"],
    out["logit_bias"]``.
    """

    def __init__(
        self,
        dist_impl: Literal["gather", "ring"] = "gather",
        tile_size: int | None = None,
        memory_budget_mb: float = tiled.DEFAULT_MEMORY_BUDGET_MB,
    ):
        super().__init__()
        if dist_impl not in ("gather", "ring"):
            raise ValueError(f"loss 'siglip_tiled': dist_impl must be 'gather' or 'ring', got {dist_impl!r}")
        self.dist_impl = dist_impl
        self.tile = tiled.choose_tile(4, memory_budget_mb, tile_size)

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "siglip_tiled")
        bias = need(
            out, "logit_bias", "siglip_tiled", "out", "Give the model a bias: model.init_logit_bias=-10."
        )
        img, txt = upcast(img), upcast(txt)
        s, b = scale.to(img.dtype), bias.to(img.dtype)
        if self.dist_impl == "ring":
            total = tiled.sigmoid_ring(img, txt, s, b, self.tile)
        else:
            all_txt = all_gather_cat(txt, with_grad=True)  # (N, D)
            total = tiled.sigmoid_pairs(img, all_txt, s, b, self.tile, local_offset(img.shape[0]))
        return {"loss": total / img.shape[0]}
