"""Geometry of a batch of embeddings: alignment, uniformity and the modality gap.

Alignment and uniformity are those of Wang & Isola (2020, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere")::

    align(x, y)    = mean_i ||x_i - y_i||^2
    uniform(x; t)  = log mean_{i != j} exp(-t ||x_i - x_j||^2)          (t = 2)
    xuniform(x, y) = log mean_{i != j} exp(-t ||x_i - y_j||^2)          (across modalities)
    modality_gap   = ||mean_i x_i - mean_i y_i||                         (Liang et al., 2022)

The first three are differentiable (``clip_unif_align`` trains with them);
``embedding_stats`` is the no-grad summary the trainer logs for every loss.
"""

from __future__ import annotations

import math

import torch


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # (N, M) squared distances; the Gram form keeps the gradient finite at distance 0.
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def alignment(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the pairs (x_i, y_i)."""
    return (x - y).pow(2).sum(dim=1).mean()


def _log_mean_exp_off_diagonal(neg_energy: torch.Tensor) -> torch.Tensor:
    n = neg_energy.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least 2 samples")
    off = ~torch.eye(n, dtype=torch.bool, device=neg_energy.device)
    return torch.logsumexp(neg_energy[off], dim=0) - math.log(n * (n - 1))


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean over pairs i != j of exp(-t ||x_i - x_j||^2); lower is more uniform."""
    return _log_mean_exp_off_diagonal(-t * _sq_dists(x, x))


def cross_uniformity(x: torch.Tensor, y: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean over non-matching pairs i != j of exp(-t ||x_i - y_j||^2)."""
    return _log_mean_exp_off_diagonal(-t * _sq_dists(x, y))


def modality_gap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Distance between the modality centroids."""
    return (x.mean(dim=0) - y.mean(dim=0)).norm()


@torch.no_grad()
def embedding_stats(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    """Floats for logging: align, uniform_img, uniform_txt (nan for B < 2), modality_gap.

    Computed on the batch it is given (the local batch under DDP), in float32 or wider.
    """
    x, y = image_emb.detach(), text_emb.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    few = x.shape[0] < 2
    return {
        "align": float(alignment(x, y)),
        "uniform_img": math.nan if few else float(uniformity(x)),
        "uniform_txt": math.nan if few else float(uniformity(y)),
        "modality_gap": float(modality_gap(x, y)),
    }
