"""M3CoL: mixup contrastive loss, mixed embeddings of one modality against soft targets over the other."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.losses.base import LOSSES, pair, upcast
from clipkit.losses.gather import broadcast_from_first, gather_features


def draw_mixup(n: int, alpha: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam (), perm (n,))``: lam ~ Beta(alpha, alpha) and a random permutation, from torch's
    CPU generator on rank 0 (broadcast, so every rank mixes the same global pairs)."""
    a = torch.tensor(float(alpha), dtype=torch.float64)
    lam = torch.distributions.Beta(a, a).sample()
    perm = torch.randperm(n)
    return broadcast_from_first(lam.to(device)), broadcast_from_first(perm.to(device))


def mixup_xent(mixed: torch.Tensor, others: torch.Tensor, scale, lam, perm) -> torch.Tensor:
    """-1/N sum_i [lam log p_i(i) + (1 - lam) log p_i(perm(i))], p_i = softmax_j(s mixed_i . others_j)."""
    logp = F.log_softmax(scale * mixed @ others.T, dim=1)  # (N, N)
    rows = torch.arange(mixed.shape[0], device=mixed.device)
    lam = lam.to(logp.dtype)
    return -(lam * logp[rows, rows] + (1 - lam) * logp[rows, perm]).mean()


@LOSSES.register("m3col")
class M3colLoss(nn.Module):
    """Multimodal mixup contrastive loss (Kumar et al., 2024, "Harnessing Shared Relations via
    Multimodal Mixup Contrastive Learning for Multimodal Classification", M3CoL), added to CLIP.

    Over the global batch of N pairs, with ``lam ~ Beta(alpha, alpha)`` and a random
    permutation ``k = perm(i)``, mix one modality (``modality="image"``: the images)::

        m_i   = normalize(lam x_i + (1 - lam) x_k)
        L_mix = -1/N sum_i [ lam log softmax_j(s m_i.y_j)[i] + (1 - lam) log softmax_j(s m_i.y_j)[k] ]
        L     = L_clip + weight * L_mix

    (``modality="text"`` mixes texts against images; ``"both"`` averages the two mixed terms,
    each with its own draw.) The paper mixes the *inputs* of one modality before its encoder;
    a loss sees only the towers' outputs, so the mixing happens on the L2-normalised
    embeddings, renormalised. For a LiT run whose image tower is locked and feature-cached,
    the only image-side computation is the projection of fixed features, so image
    embeddings are where image mixing can happen at all (for a linear projection, mixing
    cached features and mixing the unnormalised embeddings coincide; the normalisation
    makes ours weight each side by its norm). The draws use torch's CPU generator
    (deterministic given its seed); with several ranks rank 0 draws and broadcasts, so every
    rank scores the same global loss. Needs ``out["image_emb"], out["text_emb"], out["logit_scale"]``.
    """

    def __init__(self, alpha: float = 1.0, weight: float = 1.0, modality: str = "image"):
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"loss 'm3col': alpha (of Beta(alpha, alpha)) must be > 0, got {alpha}")
        if modality not in ("image", "text", "both"):
            raise ValueError(f"loss 'm3col': modality must be 'image', 'text' or 'both', got {modality!r}")
        self.alpha, self.weight, self.modality = alpha, weight, modality

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "m3col")
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D)
        n = x.shape[0]
        labels = torch.arange(n, device=x.device)
        logits = scale * x @ y.T  # (N, N)
        loss_clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        sides = {"image": [(x, y)], "text": [(y, x)], "both": [(x, y), (y, x)]}[self.modality]
        terms = []
        for mixed_side, other in sides:
            lam, perm = draw_mixup(n, self.alpha, x.device)
            lam_x = lam.to(x.dtype)
            mixed = F.normalize(lam_x * mixed_side + (1 - lam_x) * mixed_side[perm], dim=-1)
            terms.append(mixup_xent(mixed, other, scale, lam, perm))
        loss_mix = sum(terms) / len(terms)
        return {"loss": loss_clip + self.weight * loss_mix, "loss_clip": loss_clip, "loss_mix": loss_mix}
