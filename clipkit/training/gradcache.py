"""Gradient caching: a contrastive batch far larger than what fits through the towers at once.

Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".
The loss couples every pair of the batch, but the towers treat samples independently, so
``dL/dparams = sum_k (d emb_k / d params)^T dL/d emb_k`` over micro-batches k:

1. embed every micro-batch without autograd (activations freed at once);
2. run the loss once over the whole batch on detached copies of the embeddings and take
   ``dL/d emb`` (and ``dL/d logit_scale``, ``dL/d logit_bias``);
3. re-run each micro-batch with autograd and backpropagate its slice of those gradients
   (``backward(sum(emb_k * grad_k))``); the scale and bias gradients go with the last one.

The parameter gradients equal those of one forward / backward over the whole batch (to
float rounding) when the towers treat samples independently: dropout is replayed exactly
(the RNG state of each micro-batch is saved in step 1 and restored in step 3, and the
stream is left where step 1 left it); BatchNorm in train mode normalises per micro-batch,
which differs from the big batch (locked towers run in eval mode and are unaffected).
Module buffers (BN running statistics) are restored after step 1, so they are updated once
per micro-batch, not twice. Peak memory: one micro-batch's activations plus the whole
batch's embeddings, their gradients and the loss (use a tiled loss for a large batch).

Composes with: accumulation (``loss_scale`` = 1 / accumulation steps, ``sync`` only on the
last), AMP (the model's forward under ``autocast``; the loss in float32 on upcast copies),
DDP (all but the step's last backward under ``no_sync``; the loss gathers across ranks as
usual, so the cached gradients are those of the global batch), stateful losses (the loss
runs once per call). The exact call from the training loop is in ``grad_cache_step``'s docstring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch dict: the length of its ``"text"`` tensor (else the first tensor)."""
    if torch.is_tensor(batch.get("text")):
        return int(batch["text"].shape[0])
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError(f"batch has no tensor to count samples by; keys: {', '.join(batch)}")


def split_batch(batch: dict[str, Any], micro_batch: int) -> list[dict[str, Any]]:
    """Consecutive slices of at most ``micro_batch`` samples (tensors and lists of the batch's
    length are cut on dim 0; anything else, e.g. a 0-dim tensor, is kept whole in every slice).
    ``batch`` is the model inputs (``clipkit.training.stream.split_inputs``)."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    n = batch_size(batch)

    def cut(v: Any, a: int, b: int) -> Any:
        sized = (torch.is_tensor(v) and v.dim() > 0) or isinstance(v, list)
        return v[a:b] if sized and len(v) == n else v

    return [
        {k: cut(v, a, min(a + micro_batch, n)) for k, v in batch.items()} for a in range(0, n, micro_batch)
    ]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Put every buffer back as it was (so a no-grad pass leaves BN statistics untouched)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _leaves(outs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The whole batch's outputs as detached leaves: per-sample tensors concatenated (floating
    ones upcast to float32 and requiring grad), 0-dim ones (scale, bias) from the first."""
    full = {}
    for k, v in outs[0].items():
        if not torch.is_tensor(v):
            continue
        x = torch.cat([o[k] for o in outs]) if v.dim() > 0 else v
        x = x.detach()
        if x.is_floating_point():
            x = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).requires_grad_()
        full[k] = x
    return full


def grad_cache_step(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: dict[str, Any],
    micro_batch: int,
    *,
    loss_scale: float = 1.0,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[nn.Module], AbstractContextManager] | None = None,
    sync: bool = True,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """Accumulate into ``.grad`` the gradients of ``loss_scale * loss_fn(model(batch), batch)``,
    running the model on at most ``micro_batch`` samples at a time; see the module docstring.

    ``backward(t)``: how to backpropagate a scalar (``accelerator.backward``; default
    ``t.backward()``). ``no_sync(model)``: DDP's (or ``accelerator.no_sync``) context, used
    for every micro-batch but the last, and for the last too when ``sync`` is False (an
    earlier accumulation step). ``autocast()``: a context for the model's forward, for a
    model that is not already wrapped (accelerate wraps a prepared model's forward itself).
    Returns ``{"losses": {name: detached 0-dim tensor}, "out": whole-batch outputs, detached}``.

    In ``clipkit.training.loop.train_step``, instead of ``out = model(batch); losses =
    run.loss_fn(out, batch); acc.backward(losses["loss"] / len(micro))``::

        res = grad_cache_step(run.model, run.loss_fn, batch, micro_batch=m,
                              loss_scale=1 / len(micro), backward=acc.backward,
                              no_sync=acc.no_sync, sync=(i == len(micro) - 1))
        losses, out = res["losses"], res["out"]

    (without the loop's own ``no_sync`` context around it).
    """
    backward = backward or torch.Tensor.backward
    autocast = autocast or contextlib.nullcontext
    device = _model_device(model)
    parts = split_batch(batch, micro_batch)

    # 1. embed without autograd, remembering each micro-batch's RNG state
    states, outs = [], []
    with torch.no_grad(), _buffers_restored(model):
        for part in parts:
            states.append(_rng_state(device))
            with autocast():
                outs.append(model(part))
    after = _rng_state(device)

    # 2. the loss over the whole batch, and its gradient with respect to the outputs
    full = _leaves(outs)
    del outs
    losses = loss_fn(full, batch)
    wrt = [k for k, v in full.items() if v.requires_grad]
    grads = torch.autograd.grad(losses["loss"] * loss_scale, [full[k] for k in wrt], allow_unused=True)
    cached = {k: g for k, g in zip(wrt, grads) if g is not None}

    # 3. re-embed each micro-batch with autograd (same RNG) and backpropagate its slice
    start = 0
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        n = batch_size(part)
        _set_rng_state(states[i], device)
        quiet = no_sync is not None and not (last and sync)
        with no_sync(model) if quiet else contextlib.nullcontext():
            with autocast():
                out = model(part)
            terms = []
            for k, g in cached.items():
                v = out.get(k)
                if not torch.is_tensor(v) or not v.requires_grad:
                    continue
                if v.dim() > 0:
                    terms.append((v.to(g.dtype) * g[start : start + n]).sum())
                elif last:  # scale / bias: their whole gradient, once
                    terms.append((v.to(g.dtype) * g).sum())
            if terms:
                backward(sum(terms[1:], terms[0]))
        start += n
    _set_rng_state(after, device)
    detached = {k: v.detach() if torch.is_tensor(v) else v for k, v in losses.items()}
    return {"losses": detached, "out": {k: v.detach() for k, v in full.items()}}
