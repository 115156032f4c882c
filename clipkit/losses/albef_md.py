"""ALBEF's image-text contrastive loss with momentum distillation and a queue of momentum features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clipkit.losses.base import LOSSES, pair, upcast
from clipkit.losses.gather import all_gather_cat, gather_features

MODEL_INPUTS = ("image", "image_features", "image_activations", "text")  # what DualEncoder.forward reads


@LOSSES.register("albef_md")
class AlbefMomentumLoss(nn.Module):
    """Momentum distillation (Li et al., 2021, "Align before Fuse: Vision and Language
    Representation Learning with Momentum Distillation", ALBEF's ITC loss).

    An exponential moving average of the model's trainable parameters (the momentum model)
    embeds the same batch: ``x'``, ``y'`` (no gradient). Keys are the momentum embeddings of
    the global batch of N followed by the queue of Q earlier ones (``Y = [y'; queue_y]``,
    ``X = [x'; queue_x]``, (N + Q, D)); with ``s = logit_scale``::

        q_i2t = alpha * softmax_j(s x'_i.Y_j) + (1 - alpha) * onehot(i)     (N, N + Q)
        L_i2t = -1/N sum_i sum_j q_i2t[i, j] log softmax_j(s x_i.Y_j)
        L_t2i = the same with y_i, x', X;     L = (L_i2t + L_t2i) / 2

    As in ALBEF, each anchor is scored against the *momentum* keys (so ``x`` gets its
    gradient from ``L_i2t``, ``y`` from ``L_t2i``) and the soft targets use the same
    (detached) temperature. After the loss, the momentum features of the global batch are
    enqueued (training mode only; ``queue_size=0``: no queue). Options: ``alpha`` (weight of
    the soft targets, 0.4 in ALBEF), ``momentum`` (EMA decay, 0.995), ``queue_size``.

    The momentum model: ``attach(model)`` (the training loop calls it after building the
    model) copies the model's trainable parameters; ``after_step(model)`` (called after each
    optimizer step) updates them. Locked parts are shared, not copied. The momentum forward
    is ``torch.func.functional_call`` of the live model with the EMA parameters, under
    ``no_grad`` and in eval mode (no dropout, no RNG drawn, BN statistics untouched); it
    reads the batch's ``image`` or cached ``image_features`` and ``text``, so it sees exactly
    the student's inputs, and runs on the whole batch at once (also under gradient caching).
    The EMA parameters and the queue are this module's state_dict (``_extra_state``), so
    checkpoints carry them. Precomputed momentum embeddings may instead be passed as
    ``out["momentum_image_emb"], out["momentum_text_emb"]`` (L2-normalised, (B, D)).
    Needs ``out["image_emb"], out["text_emb"], out["logit_scale"]`` and the batch.
    """

    def __init__(self, alpha: float = 0.4, momentum: float = 0.995, queue_size: int = 0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss 'albef_md': alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"loss 'albef_md': momentum must be in [0, 1), got {momentum}")
        if queue_size < 0:
            raise ValueError(f"loss 'albef_md': queue_size must be >= 0, got {queue_size}")
        self.alpha, self.momentum, self.queue_size = alpha, momentum, queue_size
        self.ema: dict[str, torch.Tensor] = {}  # trainable parameter name -> its moving average
        self.queue_img = torch.zeros(0, 0)  # (filled, D), oldest first
        self.queue_txt = torch.zeros(0, 0)
        object.__setattr__(self, "_model", None)  # a reference, not a submodule (not in state_dict)

    # ------------------------------------------------------------------ the momentum model

    def attach(self, model: nn.Module) -> None:
        """Use ``model`` (unwrapped, not DDP) for momentum features; start the EMA from it
        unless a restored state already holds one for the same parameters."""
        object.__setattr__(self, "_model", model)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.ema:
            self.ema = {n: p.detach().clone() for n, p in params.items()}
            return
        if set(self.ema) != set(params) or any(self.ema[n].shape != p.shape for n, p in params.items()):
            raise ValueError(
                "loss 'albef_md': the saved momentum model does not fit this model's trainable parameters "
                f"({len(self.ema)} saved, {len(params)} trainable); check model.<tower>.locked / "
                "unlocked_layers against the checkpoint's config"
            )
        self.ema = {n: self.ema[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()}

    @torch.no_grad()
    def after_step(self, model: nn.Module | None = None) -> None:
        """EMA update ``ema <- m ema + (1 - m) param`` of every trainable parameter."""
        model = model if model is not None else self._model
        if model is None or not self.ema:
            return
        for n, p in model.named_parameters():
            if n in self.ema:
                self.ema[n].mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def momentum_embeddings(self, out: dict[str, Any], batch: dict[str, Any] | None):
        """``(x' (B, D), y' (B, D))``: from ``out`` if given, else the momentum model on the batch."""
        if out.get("momentum_image_emb") is not None and out.get("momentum_text_emb") is not None:
            return out["momentum_image_emb"].detach(), out["momentum_text_emb"].detach()
        model = self._model
        if model is None or batch is None:
            raise KeyError(
                "loss 'albef_md' needs its momentum model (loss.attach(model), which the training loop "
                "calls) and the batch, or out['momentum_image_emb'] and out['momentum_text_emb']"
            )
        inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
        was_training = model.training
        model.eval()
        try:
            m_out = functional_call(model, self.ema, (inputs,), strict=False)
        finally:
            model.train(was_training)
        return m_out["image_emb"], m_out["text_emb"]

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "ema": {n: t.detach().clone() for n, t in self.ema.items()},
            "queue_img": self.queue_img.clone(),
            "queue_txt": self.queue_txt.clone(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        device = next(iter(self.ema.values())).device if self.ema else None
        self.ema = {n: t.clone() if device is None else t.to(device) for n, t in state["ema"].items()}
        self.queue_img, self.queue_txt = state["queue_img"].clone(), state["queue_txt"].clone()

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Append the global batch's momentum features, keeping the newest ``queue_size``."""
        keep = self.queue_size
        old_img = self.queue_img.to(x) if self.queue_img.numel() else x[:0]
        old_txt = self.queue_txt.to(y) if self.queue_txt.numel() else y[:0]
        self.queue_img = torch.cat([old_img, x.detach()])[-keep:].clone()
        self.queue_txt = torch.cat([old_txt, y.detach()])[-keep:].clone()

    # ------------------------------------------------------------------ loss

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "albef_md")
        m_img, m_txt = self.momentum_embeddings(out, batch)
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D), with gradient
        mx = all_gather_cat(upcast(m_img).to(x.dtype), with_grad=False)  # (N, D) momentum images
        my = all_gather_cat(upcast(m_txt).to(x.dtype), with_grad=False)  # (N, D) momentum texts
        keys_img = torch.cat([mx, self.queue_img.to(mx)]) if self.queue_img.numel() else mx  # (N+Q, D)
        keys_txt = torch.cat([my, self.queue_txt.to(my)]) if self.queue_txt.numel() else my
        n = x.shape[0]
        onehot = torch.eye(n, keys_txt.shape[0], dtype=x.dtype, device=x.device)  # (N, N+Q)
        s = scale.detach()
        with torch.no_grad():
            q_i2t = self.alpha * F.softmax(s * mx @ keys_txt.T, dim=1) + (1 - self.alpha) * onehot
            q_t2i = self.alpha * F.softmax(s * my @ keys_img.T, dim=1) + (1 - self.alpha) * onehot
        loss_i2t = -(q_i2t * F.log_softmax(scale * x @ keys_txt.T, dim=1)).sum(dim=1).mean()
        loss_t2i = -(q_t2i * F.log_softmax(scale * y @ keys_img.T, dim=1)).sum(dim=1).mean()
        if self.training and self.queue_size:
            self.enqueue(mx, my)
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}
