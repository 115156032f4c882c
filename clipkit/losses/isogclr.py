"""iSogCLR: SogCLR with an individual, learned temperature per sample."""

from __future__ import annotations

from typing import Any

import torch

from clipkit.losses.base import LOSSES
from clipkit.losses.sogclr import GlobalContrastiveBase, global_side, value_with_grad


@LOSSES.register("isogclr")
class ISogClrLoss(GlobalContrastiveBase):
    """iSogCLR (Qiu et al., 2023, "Not All Semantics are Created Equal: Contrastive
    Self-supervised Learning with Automatic Temperature Individualization"), bimodal.

    Each sample has its own temperature as image anchor and as text anchor; the robust
    global contrastive objective (a KL-constrained DRO with radius ``rho``) is::

        F = 1/n sum_i tau_i [ log( mean_{j != i} exp(d_ij / tau_i) ) + rho ]  + text anchors

    with ``d_ij = x_i.y_j - x_i.y_i``. The denominators are tracked as in ``sogclr`` (moving
    average ``u_i``, rate ``gamma``); the network gets ``tau_i / u_i * grad g_i``; each
    temperature takes a momentum step on its own gradient estimate::

        G_i = log u_i + rho - sum_j exp(d_ij / tau_i) / ((N-1) u_i) * d_ij / tau_i
        m_i <- (1 - tau_beta) m_i + tau_beta clip(G_i, tau_grad_clip)
        tau_i <- clamp(tau_i - tau_lr m_i, tau_min, tau_max)

    The temperatures are updated here, in training mode, not by the model's optimizer.
    ``loss`` has F's value on this batch and the gradient above; parts give each half
    and the batch's mean temperatures. All state (``log_u_*``, ``tau_*``, ``tau_m_*``, size
    ``num_samples``) is in the state_dict. Needs ``out["image_emb"], out["text_emb"]`` and
    ``batch["idx"]`` in [0, num_samples); ``out["logit_scale"]`` is not used.

    Tiling: no tiled version yet, as ``sogclr`` (the temperature step also needs the row
    sums of ``w_ij z_ij``). Gradient caching works (the loss runs once per step).
    """

    def __init__(
        self,
        num_samples: int,
        gamma: float = 0.8,
        rho: float = 8.0,
        tau_init: float = 0.01,
        tau_min: float = 0.005,
        tau_max: float = 1.0,
        tau_lr: float = 0.03,
        tau_beta: float = 0.9,
        tau_grad_clip: float = 5.0,
    ):
        super().__init__(num_samples, gamma)
        if not 0 < tau_min <= tau_init <= tau_max:
            raise ValueError(
                f"loss 'isogclr': need 0 < tau_min <= tau_init <= tau_max, got "
                f"{tau_min}, {tau_init}, {tau_max}"
            )
        self.rho, self.tau_min, self.tau_max = rho, tau_min, tau_max
        self.tau_lr, self.tau_beta, self.tau_grad_clip = tau_lr, tau_beta, tau_grad_clip
        for side in ("img", "txt"):
            self.register_buffer(f"tau_{side}", torch.full((num_samples,), float(tau_init)))
            self.register_buffer(f"tau_m_{side}", torch.zeros(num_samples))  # momentum of the tau step

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        sim, ids = self.inputs(out, batch)
        parts = {}
        for side, s in (("img", sim), ("txt", sim.T)):
            state, taus, moms = (getattr(self, f"{k}_{side}") for k in ("log_u", "tau", "tau_m"))
            tau = taus[ids].to(sim.dtype)  # (N,)
            surrogate, log_g, log_u, w, z = global_side(
                s, tau, state[ids].to(sim.dtype), self.gamma, self.training
            )
            parts[f"loss_{side}"] = value_with_grad(surrogate, tau * (log_g + self.rho))
            parts[f"tau_{side}"] = tau.mean()
            if self.training:
                grad_tau = log_u + self.rho - (w * z).sum(dim=1)  # (N,)
                grad_tau = grad_tau.clamp(-self.tau_grad_clip, self.tau_grad_clip)
                m = (1 - self.tau_beta) * moms[ids].to(sim.dtype) + self.tau_beta * grad_tau
                self.write(state, ids, log_u)
                self.write(moms, ids, m)
                self.write(taus, ids, (tau - self.tau_lr * m).clamp(self.tau_min, self.tau_max))
        return {"loss": parts["loss_img"] + parts["loss_txt"], **parts}
