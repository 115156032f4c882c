"""SogCLR: global contrastive loss with moving-average estimates of the denominators."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from clipkit.losses.base import LOSSES, pair, sample_ids, upcast
from clipkit.losses.gather import all_gather_cat, gather_features


def first_rows(ids: torch.Tensor) -> torch.Tensor:
    """Row of the first occurrence of each distinct id (so state writes are deterministic)."""
    n = ids.shape[0]
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.shape[0],), n, dtype=torch.long, device=ids.device)
    return first.scatter_reduce(0, inverse, torch.arange(n, device=ids.device), reduce="amin")


def moving_log_average(log_u: torch.Tensor, log_g: torch.Tensor, gamma: float) -> torch.Tensor:
    """log((1 - gamma) u + gamma g); a never-seen sample (log_u = -inf) starts at u = g."""
    if gamma == 1:
        return log_g
    mixed = torch.logaddexp(log_u + math.log1p(-gamma), log_g + math.log(gamma))
    return torch.where(torch.isneginf(log_u), log_g, mixed)


def global_side(sim: torch.Tensor, tau: torch.Tensor, log_u_old: torch.Tensor, gamma: float, update: bool):
    """One direction of the global contrastive loss, anchors on the rows of ``sim`` (N, N).

    ``d_ij = sim_ij - sim_ii`` (negative j against anchor i's positive), ``z = d / tau_i``,
    ``g_i = mean_{j != i} exp(z_ij)`` (the batch estimate of the anchor's denominator),
    ``u_i`` its moving average. Returns ``(surrogate (N,), log_g, log_u, w, z)`` where
    ``surrogate_i = sum_j w_ij d_ij`` with ``w_ij = exp(z_ij) / ((N-1) u_i)`` held constant:
    its gradient is SogCLR's estimate of the gradient of ``tau_i log g_i``.
    """
    n = sim.shape[0]
    if n < 2:
        raise ValueError("the global contrastive loss needs at least 2 pairs in the (global) batch")
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    d = sim - sim.diagonal()[:, None]  # (N, N)
    z = d.detach() / tau[:, None]  # (N, N)
    log_g = torch.logsumexp(z.masked_fill(eye, -math.inf), dim=1) - math.log(n - 1)  # (N,)
    if update:
        log_u = moving_log_average(log_u_old, log_g, gamma)
    else:  # evaluation: read the state, never write it
        log_u = torch.where(torch.isneginf(log_u_old), log_g, log_u_old)
    w = torch.exp(z - log_u[:, None]).masked_fill(eye, 0.0) / (n - 1)  # (N, N), constant
    return (w * d).sum(dim=1), log_g, log_u, w, z


def value_with_grad(surrogate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """mean of ``value`` (no grad) carrying the gradient of mean ``surrogate``."""
    return (surrogate - surrogate.detach() + value.detach()).mean()


class GlobalContrastiveBase(nn.Module):
    """Per-sample state of the image and text anchors, indexed by ``batch["idx"]``."""

    def __init__(self, num_samples: int, gamma: float):
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"loss '{self.registry_name}': num_samples (dataset size) must be >= 1")
        if not 0 < gamma <= 1:
            raise ValueError(f"loss '{self.registry_name}': gamma must be in (0, 1], got {gamma}")
        self.num_samples, self.gamma = num_samples, gamma
        # log u for each sample as image anchor / as text anchor; -inf = not seen yet.
        self.register_buffer("log_u_img", torch.full((num_samples,), -math.inf))
        self.register_buffer("log_u_txt", torch.full((num_samples,), -math.inf))

    def inputs(self, out: dict[str, Any], batch: dict[str, Any] | None):
        """Global ``(sim (N, N) = x @ y.T, ids (N,))`` and a device check of the state."""
        img, txt, _ = pair(out, self.registry_name)
        ids = sample_ids(batch, self.registry_name, num_samples=self.num_samples).to(img.device)
        x, y = gather_features(upcast(img), upcast(txt))
        if self.log_u_img.device != x.device:
            raise RuntimeError(
                f"loss '{self.registry_name}' keeps its per-sample state on {self.log_u_img.device} but the "
                f"embeddings are on {x.device}: move the loss with loss.to(device)"
            )
        return x @ y.T, all_gather_cat(ids, with_grad=False)

    @torch.no_grad()
    def write(self, buffer: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
        rows = first_rows(ids)  # a sample twice in one batch is written once, from its first row
        buffer[ids[rows]] = values[rows].to(buffer.dtype)


@LOSSES.register("sogclr")
class SogClrLoss(GlobalContrastiveBase):
    """SogCLR (Yuan et al., 2022, "Provable Stochastic Optimization for Global Contrastive
    Learning: Small Batch Does Not Harm Performance"), bimodal, one global temperature.

    With ``d_ij = x_i.y_j - x_i.y_i`` and anchors over the dataset (images and texts)::

        F = 1/n sum_i tau log( mean_{j != i} exp(d_ij / tau) )  +  the same for text anchors

    The inner mean over all negatives in the dataset is tracked per sample by a moving
    average ``u_i <- (1 - gamma) u_i + gamma g_i`` of its batch estimate ``g_i`` (``u_i = g_i``
    on a sample's first visit) and the gradient uses ``tau / u_i * grad g_i``.
    ``loss`` has the value of F on this batch (``g`` in place of ``u``) and that gradient;
    the parts are the image- and text-anchor halves. The state (``log_u_img``,
    ``log_u_txt``, size ``num_samples``) lives in the state_dict, is updated only in
    training mode, and must be on the embeddings' device (``loss.to(device)``).
    Gradients are ``tau`` times those of InfoNCE at scale ``1/tau``: tune the lr for it.
    Needs ``out["image_emb"], out["text_emb"]`` and ``batch["idx"]`` in [0, num_samples);
    ``out["logit_scale"]`` is not used.

    Tiling: no tiled version yet (memory O(N^2)). The maths allows one: ``g_i`` and the
    surrogate's weights are row sums of ``exp(d_ij / tau_i)``, which needs a per-row scale
    in the kernel of ``clipkit.losses.tiled``. Gradient caching
    (``train.grad_cache_micro_batch``) works: the loss, and its state update, runs once per
    step over the whole batch.
    """

    def __init__(self, num_samples: int, temperature: float = 0.01, gamma: float = 0.9):
        super().__init__(num_samples, gamma)
        if temperature <= 0:
            raise ValueError(f"loss 'sogclr': temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        sim, ids = self.inputs(out, batch)
        tau = torch.full((sim.shape[0],), self.temperature, dtype=sim.dtype, device=sim.device)
        parts = {}
        for side, s, state in (("img", sim, self.log_u_img), ("txt", sim.T, self.log_u_txt)):
            old = state[ids].to(sim.dtype)
            surrogate, log_g, log_u, _, _ = global_side(s, tau, old, self.gamma, self.training)
            parts[f"loss_{side}"] = value_with_grad(surrogate, tau * log_g)
            if self.training:
                self.write(state, ids, log_u)
        return {"loss": parts["loss_img"] + parts["loss_txt"], **parts}
