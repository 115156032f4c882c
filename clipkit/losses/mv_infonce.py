"""Multi-view InfoNCE over images with several captions."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from clipkit.losses.base import LOSSES, need, pair, sample_ids, upcast
from clipkit.losses.gather import all_gather_cat, gather_features


@LOSSES.register("mv_infonce")
class MultiViewInfoNceLoss(nn.Module):
    """MV-InfoNCE (Koromilas et al., 2025, "A Principled Framework for Multi-View
    Contrastive Learning"), cross-modal: one term per instance that aligns all its views.

    Input convention: each row of the batch is one (image, caption) pair; rows whose
    ``batch[group_key]`` (default ``"idx"``, the dataset sample index) are equal are views
    of the same instance, e.g. one image repeated with each of its K captions. With
    ``z_rc = s x_r.y_c`` over the global batch and G an instance (set of rows). With
    ``group_key="text"`` rows with identical caption tokens are one instance instead: several
    images of one caption (the colour and silhouette views of an emoji) are its views.
    With ``z_rc = s x_r.y_c`` over the global batch and G an instance (set of rows)::

        L_G = -log( 2 sum_{r in G, c in G} exp(z_rc)
                    / [ sum_{r in G} sum_c exp(z_rc) + sum_{c in G} sum_r exp(z_rc) ] )
        L   = mean over the instances G of the batch

    Positives are every image-caption pair of the instance, counted in both directions
    (the paper's sum over ordered view pairs); the energy holds every cross-modal
    interaction of the instance's views, positives included, as in the paper. Only
    image-text interactions are scored (like CLIP); with one row per instance this is
    ``-log(2 e^{z_ii} / (sum_c e^{z_ic} + sum_r e^{z_ri}))``. Needs ``out["image_emb"],
    out["text_emb"], out["logit_scale"]`` and ``batch[group_key]`` (ids >= 0).

    Tiling: no tiled version yet (memory O(N^2)). The maths allows one: the energy is the
    row and column logsumexps of ``clipkit.losses.tiled.softmax_xent``; the positives are
    logsumexps over each instance's own pairs, O(sum of squared group sizes) from an index
    list. Gradient caching (``train.grad_cache_micro_batch``) works as for any loss.
    """

    def __init__(self, group_key: str = "idx"):
        super().__init__()
        self.group_key = group_key

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "mv_infonce")
        if self.group_key == "text":  # rows with the same caption tokens are views of one instance
            ids = caption_ids(need(batch, "text", "mv_infonce", "batch")).to(img.device)
        else:
            ids = sample_ids(batch, "mv_infonce", key=self.group_key).to(img.device)
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D)
        groups = all_gather_cat(ids, with_grad=False)  # (N,)
        logits = scale * x @ y.T  # (N, N): image rows, text columns
        _, member = torch.unique(groups, return_inverse=True)  # (N,) instance of each row
        n_inst = int(member.max()) + 1
        same = member[:, None] == member[None, :]  # (N, N): image r and caption c of one instance
        # log sum over the instance's image-caption pairs, via per-image-row partial sums
        pos_rows = torch.logsumexp(logits.masked_fill(~same, -math.inf), dim=1)  # (N,)
        pos = _group_lse(pos_rows, member, n_inst)  # (G,)
        # energy: every interaction of the instance's images (rows) and captions (columns)
        energy_parts = torch.cat([logits.logsumexp(dim=1), logits.logsumexp(dim=0)])  # (2N,)
        energy = _group_lse(energy_parts, member.repeat(2), n_inst)  # (G,)
        per_instance = -(math.log(2.0) + pos - energy)  # (G,)
        instances = torch.tensor(float(n_inst), device=logits.device)
        return {"loss": per_instance.mean(), "instances": instances}


def caption_ids(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) int64 id of each row of token ids (B, L): equal rows, equal ids, on every rank.

    Two polynomial hashes modulo the prime 2^31 - 1 (products stay below 2^52: no int64
    overflow), joined into 62 bits: collisions ~ B^2 / 2^62, and ids agree across processes
    without any exchange.
    """
    p = (1 << 31) - 1
    h1 = torch.zeros(tokens.shape[0], dtype=torch.int64, device=tokens.device)
    h2 = torch.zeros_like(h1)
    for col in tokens.long().unbind(dim=1):
        h1 = (h1 * 1_000_003 + col + 1) % p
        h2 = (h2 * 65_599 + col + 7) % p
    return (h1 << 31) | h2


def _group_lse(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(G,) log sum_{k: group[k] = g} exp(values[k]), in O(len(values)) memory."""
    top = torch.full((n_groups,), -math.inf, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, group, values.detach(), reduce="amax")  # any constant shift is exact
    total = torch.zeros_like(top).scatter_add(0, group, torch.exp(values - top[group]))
    return top + torch.log(total)
