"""MoCHi: synthetic hard negatives mixed in feature space from each anchor's hardest negatives."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.losses.base import LOSSES, pair, upcast
from clipkit.losses.gather import broadcast_from_first, gather_features


def draw_mixes(
    n: int, hard: int, mixes: int, anchor_mixes: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The random part of MoCHi for ``n`` anchors, drawn from torch's CPU generator on rank 0.

    ``pair_a``, ``pair_b`` (n, mixes): ranks (0 = hardest) of the two hard negatives of each
    mix; ``alpha`` (n, mixes) in (0, 1); ``neg`` (n, anchor_mixes): rank of the negative
    mixed with the anchor; ``beta`` (n, anchor_mixes) in (0, 0.5).
    """
    draws = {
        "pair_a": torch.randint(0, hard, (n, mixes)),
        "pair_b": torch.randint(0, hard, (n, mixes)),
        "alpha": torch.rand(n, mixes, dtype=torch.float64),
        "neg": torch.randint(0, hard, (n, anchor_mixes)),
        "beta": 0.5 * torch.rand(n, anchor_mixes, dtype=torch.float64),
    }
    return {k: broadcast_from_first(v.to(device)) for k, v in draws.items()}


def synthetic_negatives(anchors: torch.Tensor, keys: torch.Tensor, draws: dict[str, torch.Tensor], hard: int):
    """(n, mixes + anchor_mixes, D) normalised synthetic negatives per anchor, no gradient.

    ``anchors`` (n, D) and ``keys`` (n, D): key i is anchor i's positive, every other key a
    negative. Hardest = highest ``anchor_i . key_j`` over j != i (ties by lower index).
    """
    with torch.no_grad():
        a, k = anchors.detach(), keys.detach()
        n = a.shape[0]
        sim = (a @ k.T).masked_fill(torch.eye(n, dtype=torch.bool, device=a.device), -torch.inf)  # (n, n)
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :hard]  # (n, hard)
        hardest = k[order]  # (n, hard, D)

        def take(ranks: torch.Tensor) -> torch.Tensor:  # (n, m) ranks -> (n, m, D) keys
            return torch.gather(hardest, 1, ranks[..., None].expand(-1, -1, k.shape[1]))

        alpha = draws["alpha"].to(k.dtype)[..., None]
        beta = draws["beta"].to(k.dtype)[..., None]
        mixed = alpha * take(draws["pair_a"]) + (1 - alpha) * take(draws["pair_b"])  # (n, s, D)
        with_anchor = beta * a[:, None, :] + (1 - beta) * take(draws["neg"])  # (n, s', D)
        return F.normalize(torch.cat([mixed, with_anchor], dim=1), dim=-1)


def mochi_direction(anchors, keys, scale, draws, hard):
    """InfoNCE of each anchor against all keys plus its own synthetic negatives."""
    synth = synthetic_negatives(anchors, keys, draws, hard)  # (n, m, D), constant
    logits = scale * anchors @ keys.T  # (n, n)
    extra = scale * torch.einsum("nd,nmd->nm", anchors, synth)  # (n, m)
    full = torch.cat([logits, extra], dim=1)  # (n, n + m)
    labels = torch.arange(anchors.shape[0], device=anchors.device)
    return F.cross_entropy(full, labels)


@LOSSES.register("mochi")
class MochiLoss(nn.Module):
    """Hard negative mixing (Kalantidis et al., 2020, "Hard Negative Mixing for Contrastive
    Learning", MoCHi), cross-modal, in-batch, both directions.

    For image anchor ``x_i`` the negatives are the other texts ``y_j``; take the ``num_hard``
    (N_h) with the highest ``x_i.y_j`` and synthesise, without gradient::

        h_k  = normalize(a_k n_p + (1 - a_k) n_q),   n_p, n_q random among the N_h,
               a_k ~ U(0, 1),  k = 1..num_mix                         (mixes of two hard negatives)
        h'_k = normalize(b_k x_i + (1 - b_k) n_p),  b_k ~ U(0, 0.5), k = 1..num_anchor_mix
               (the anchor mixed with a hard negative; in the shared embedding space)
        L_i2t = -1/N sum_i log( e^{s x_i.y_i} / (sum_j e^{s x_i.y_j} + sum_k e^{s x_i.h_k} + sum_k e^{s x_i.h'_k}) )

    and ``L_t2i`` the same with text anchors and image negatives; ``L = (L_i2t + L_t2i) / 2``.
    The paper mixes negatives of a MoCo queue; here they come from the global batch (N_h is
    capped at N - 1). The draws use torch's CPU generator (deterministic given its seed); with
    several ranks rank 0 draws and broadcasts, so every rank scores the same global loss.
    Needs ``out["image_emb"], out["text_emb"], out["logit_scale"]``.
    """

    def __init__(self, num_hard: int = 16, num_mix: int = 16, num_anchor_mix: int = 4):
        super().__init__()
        if num_hard < 1 or num_mix < 0 or num_anchor_mix < 0:
            raise ValueError(
                f"loss 'mochi': num_hard must be >= 1 and num_mix, num_anchor_mix >= 0, got "
                f"{num_hard}, {num_mix}, {num_anchor_mix}"
            )
        self.num_hard, self.num_mix, self.num_anchor_mix = num_hard, num_mix, num_anchor_mix

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "mochi")
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D)
        n = x.shape[0]
        if n < 2:
            raise ValueError("loss 'mochi' needs at least 2 pairs in the (global) batch")
        hard = min(self.num_hard, n - 1)
        parts = {}
        for side, anchors, keys in (("i2t", x, y), ("t2i", y, x)):
            draws = draw_mixes(n, hard, self.num_mix, self.num_anchor_mix, x.device)
            parts[f"loss_{side}"] = mochi_direction(anchors, keys, scale, draws, hard)
        return {"loss": (parts["loss_i2t"] + parts["loss_t2i"]) / 2, **parts}
