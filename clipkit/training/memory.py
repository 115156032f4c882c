"""Predicted peak memory of a training step, per device, and the largest batch for a budget.

``estimate_peak_memory(cfg)`` adds up, for one rank (bytes):

- ``parameters``, ``gradients`` (trainable only), ``optimizer`` (AdamW: 2 x trainable) and,
  with several ranks, ``ddp_buckets`` (DDP's copy of the gradients): counted from the model;
- ``batch``: the input batch on the device (bytes per synthetic sample x batch);
- ``activations``: what autograd keeps per sample for the towers' backward, *measured*: the
  model runs forward with autograd on synthetic batches of 2 and 4 samples (images of the
  recipe's size, or cached features when the feature cache applies; tokenized text), under
  the recipe's precision, while ``LiveBytes`` counts the bytes of live tensor storage; the
  slope per sample times the samples that go through the towers at once (the batch, or the
  gradient-caching micro-batch);
- ``embeddings``: with gradient caching, the whole batch's float32 embeddings; with several
  ranks, the gathered (N, D) global batch and its gradient;
- ``loss``: *measured* (peak of forward + backward, embedding gradients included) on the
  configured loss at two small global batches and
  fitted as ``a rows N + b N`` (rows = the rank's B for losses that score only local rows:
  ``siglip*``, ``clip*`` with ``local_loss``; else N); tiled losses are probed with a
  16-wide tile and get their real tile's blocks (``tiled.tile_bytes``) added.

Not counted: the allocator's caching and fragmentation (CUDA's reserved minus allocated),
CUDA context and library workspaces (~0.3-1 GB per GPU), the data loader and, on CPU, the
~0.5 GB that ``import torch`` itself takes. The probe runs on the CPU, so a tower that saves
different tensors on another device (fused attention kernels) is measured as on the CPU.

``find_batch_size(cfg, budget)`` searches this prediction for the largest batch that fits,
then measures real training steps (in this process, under ``LiveBytes``) and moves the
batch towards the budget from the measurements.

The trainer's ``clipkit train --dry-run`` / ``--find-batch-size`` print ``format_estimate``.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from clipkit.config import Config
from clipkit.errors import ClipkitError
from clipkit.training.compute import apply_grad_checkpointing

GiB, MiB = 2**30, 2**20
PROBE_BATCHES = (2, 4)  # samples per tower probe
PROBE_GLOBAL = (128, 256)  # global batches of the loss probe
PROBE_TILE = 16
ROW_LOCAL_LOSSES = ("siglip", "siglip_tiled")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the tensors created inside the context.

    Every op's outputs are counted when created and uncounted when their storage is freed
    (views and in-place results share a storage and count once). Tensors created before the
    context are not counted. Works on any device, including ``meta`` (a dry run without data).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        ref = self._refs.get(key)
        if ref is not None and ref() is storage:
            return
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        self._refs[key] = weakref.ref(storage, lambda _, k=key, n=n: self._freed(k, n))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out


# ----------------------------------------------------------------------------- probes


def _autocast(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def synthetic_batch(model: nn.Module, cfg: Config, n: int, cached: bool, device: torch.device) -> dict:
    """A batch of ``n`` random images (or cached-feature rows) and tokenized captions.

    The captions fill the context: text towers run on the batch's longest caption
    (``clipkit.models.text_padding``), so the peak is that of a batch with one full-length caption.
    """
    text = model.tokenize([" ".join(["cat"] * 512)] * n).to(device)  # truncated to the context
    batch: dict[str, Any] = {"text": text, "idx": torch.arange(n, device=device)}  # model inputs only
    if cached:
        batch["image_features"] = torch.randn(n, model.vision.out_dim, device=device)
    else:
        side = cfg.model.vision.image_size
        batch["image"] = torch.randn(n, 3, side, side, device=device)
    return batch


def _feature_cache_applies(cfg: Config, model: nn.Module) -> bool:
    from clipkit.training.feature_cache import why_not_cached

    return why_not_cached(cfg, model) is None


def probe_activations(model: nn.Module, cfg: Config) -> tuple[int, int]:
    """``(activation bytes, input bytes)`` per sample of the towers (measured).

    Activations: the tensor storage alive at the end of a forward with autograd (what the
    backward will read, and the outputs), as a slope over ``PROBE_BATCHES`` so that
    per-batch constants drop out. The backward's peak adds the parameter gradients (counted
    separately) and one layer's activation gradients at a time. Inputs: the synthetic batch.
    Leaves ``model`` in the mode it was in.
    """
    device = next(model.parameters()).device
    cached = _feature_cache_applies(cfg, model)
    was_training = model.training
    model.train()
    live, inputs = [], []
    for n in PROBE_BATCHES:
        batch = synthetic_batch(model, cfg, n, cached, device)
        inputs.append(sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v)))
        with LiveBytes() as mem, _autocast(cfg.train.precision, device):
            out = model(batch)
            live.append(mem.live)
        del out
    model.train(was_training)
    span = PROBE_BATCHES[1] - PROBE_BATCHES[0]
    return max(0, round((live[1] - live[0]) / span)), round((inputs[1] - inputs[0]) / span)


def _loss_probe_inputs(n: int, d: int, loss_args: dict) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    leaf = lambda x: x.requires_grad_()
    out = {
        "image_emb": leaf(torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)),
        "text_emb": leaf(torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)),
        "logit_scale": leaf(torch.tensor(10.0)),
        "logit_bias": leaf(torch.tensor(-10.0)),
        "image_tower_features": torch.randn(n, 8, generator=g),
        "teacher_logit_scale": torch.tensor(10.0),
    }
    for key in ("momentum_image_emb", "momentum_text_emb", "teacher_image_emb", "teacher_text_emb"):
        out[key] = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)  # albef_md, distill
    ids = torch.arange(n) % int(loss_args.get("num_samples", n))
    return out, {"idx": ids}


def is_tiled(loss_name: str) -> bool:
    from clipkit.losses import LOSSES

    return "tile_size" in inspect.signature(LOSSES.get(loss_name)).parameters


def probe_loss(cfg: Config) -> tuple[float, float]:
    """``(a, b)`` of the loss's forward + backward bytes ``a rows N + b N`` (measured at N =
    ``PROBE_GLOBAL``, float32, D = embed_dim; tiled losses with a 16-wide tile)."""
    from clipkit.losses import LOSSES

    args = dict(cfg.loss.args)
    if "teacher" in args:  # distill_kl, dclip: the teacher's outputs come with the probe's inputs
        args["teacher"] = None
    if is_tiled(cfg.loss.name):
        args["tile_size"] = PROBE_TILE
    peaks = []
    for n in PROBE_GLOBAL:
        out, batch = _loss_probe_inputs(n, cfg.model.embed_dim, args)
        loss_fn = LOSSES.build(cfg.loss.name, **args)
        with LiveBytes() as mem:
            loss_fn(out, batch)["loss"].backward()
        peaks.append(mem.peak)
    (n1, n2), (m1, m2) = PROBE_GLOBAL, peaks
    if is_tiled(cfg.loss.name):  # linear (the 16x16 blocks are noise): the slope alone
        return 0.0, (m2 - m1) / (n2 - n1)
    a = (m2 / n2 - m1 / n1) / (n2 - n1)
    return max(a, 0.0), m1 / n1 - a * n1


def _rows_are_local(cfg: Config) -> bool:
    return cfg.loss.name in ROW_LOCAL_LOSSES or bool(cfg.loss.args.get("local_loss", False))


# ----------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryModel:
    """The measured and counted quantities; ``predict(batch)`` is then arithmetic."""

    cfg: Config
    world_size: int
    micro_batch: int | None
    n_params: int
    param_bytes: int
    trainable_bytes: int
    activation_per_sample: int
    input_per_sample: int
    loss_quadratic: float
    loss_linear: float
    feature_cache: bool

    @classmethod
    def measure(
        cls, cfg: Config, world_size: int = 1, micro_batch: int | None = None, model: nn.Module | None = None
    ) -> MemoryModel:
        from clipkit.models import build_model

        if micro_batch is not None and micro_batch < 1:
            raise ClipkitError(f"gradient-caching micro-batch must be >= 1, got {micro_batch}")
        if model is None:
            model = build_model(cfg.model)
            if cfg.train.grad_checkpointing:  # fewer activations kept for the backward
                apply_grad_checkpointing(model)
        params = list(model.parameters())
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
        a, b = probe_loss(cfg)
        act, inp = probe_activations(model, cfg)
        return cls(
            cfg=cfg,
            world_size=world_size,
            micro_batch=micro_batch,
            n_params=sum(p.numel() for p in params),
            param_bytes=nbytes(params) + nbytes(model.buffers()),
            trainable_bytes=nbytes(p for p in params if p.requires_grad),
            activation_per_sample=act,
            input_per_sample=inp,
            loss_quadratic=a,
            loss_linear=b,
            feature_cache=_feature_cache_applies(cfg, model),
        )

    def tile(self, n: int) -> int | None:
        if not is_tiled(self.cfg.loss.name):
            return None
        from clipkit.losses import LOSSES

        return min(LOSSES.build(self.cfg.loss.name, **self.cfg.loss.args).tile, n)

    def predict(self, batch: int) -> dict[str, Any]:
        """Peak bytes per device for ``batch`` samples per rank: ``{"total", "parts", "notes", ...}``."""
        world, d = self.world_size, self.cfg.model.embed_dim
        n = batch * world  # the global contrastive batch
        through = min(self.micro_batch or batch, batch)
        rows = batch if _rows_are_local(self.cfg) else n
        tile = self.tile(n)
        from clipkit.losses import tiled

        loss = (
            self.loss_quadratic * rows * n + self.loss_linear * n + (tiled.tile_bytes(tile, 4) if tile else 0)
        )
        # float32 leaves of the whole batch (gradient caching; their gradients are in the loss
        # probe), the gathered global batch and its gradient (several ranks)
        embeddings = (2 * 4 * batch * d if self.micro_batch else 0) + (4 * 4 * n * d if world > 1 else 0)
        parts = {
            "parameters": self.param_bytes,
            "gradients": self.trainable_bytes,
            "optimizer": 2 * self.trainable_bytes,
            "ddp_buckets": self.trainable_bytes if world > 1 else 0,
            "batch": self.input_per_sample * batch,
            "activations": self.activation_per_sample * through,
            "embeddings": embeddings,
            "loss": round(loss),
        }
        notes = {
            "parameters": f"{self.n_params / 1e6:.1f}M parameters, + buffers (counted)",
            "gradients": "trainable parameters (counted)",
            "optimizer": "AdamW exp_avg + exp_avg_sq (counted)",
            "ddp_buckets": "DDP gradient buckets (counted)",
            "batch": f"the input batch on the device, {self.input_per_sample:,} bytes/sample",
            "activations": (
                f"{self.activation_per_sample / MiB:.3f} MiB/sample x {through} "
                f"{'(gradient-caching micro-batch)' if self.micro_batch else 'samples'} "
                f"(measured after a forward at batch {PROBE_BATCHES[0]} and {PROBE_BATCHES[1]}, "
                f"{'cached image features' if self.feature_cache else 'images'}, {self.cfg.train.precision})"
            ),
            "embeddings": "whole-batch float32 embeddings (gradient caching), gathered (N, D) + grads (ranks)",
            "loss": (
                f"'{self.cfg.loss.name}' over {rows:,} x {n:,} logits"
                + (f", tile {tile}" if tile else "")
                + f" (measured at N = {PROBE_GLOBAL[0]}, {PROBE_GLOBAL[1]}; fitted)"
            ),
        }
        return {
            "total": sum(parts.values()),
            "parts": parts,
            "notes": notes,
            "batch": batch,
            "world_size": world,
            "micro_batch": self.micro_batch,
            "tile": tile,
            "precision": self.cfg.train.precision,
        }


def estimate_peak_memory(
    cfg: Config, *, world_size: int = 1, micro_batch: int | None = None, model: nn.Module | None = None
) -> dict[str, Any]:
    """Predicted peak bytes per device of one training step of ``cfg`` (batch
    ``cfg.data.batch_size`` per rank, ``world_size`` ranks, gradient caching with
    ``micro_batch`` samples through the towers at once, or None without); see the module
    docstring for what is measured and what is counted. ``model``: an already built
    ``build_model(cfg.model)`` (saves building one). Print it with ``format_estimate``."""
    return MemoryModel.measure(cfg, world_size, micro_batch, model).predict(cfg.data.batch_size)


def format_estimate(est: dict[str, Any]) -> str:
    """Lines for ``clipkit train --dry-run``."""
    how = (
        f"gradient caching, micro-batch {est['micro_batch']}" if est["micro_batch"] else "no gradient caching"
    )
    lines = [
        f"predicted peak memory per device: {est['total'] / GiB:.2f} GiB "
        f"(batch {est['batch']:,} x {est['world_size']} rank(s), {how}, precision {est['precision']}"
        + (f", loss tile {est['tile']}" if est["tile"] else "")
        + ")"
    ]
    for name, value in est["parts"].items():
        if value:
            lines.append(f"  {name:<12} {value / MiB:>10.1f} MiB  {est['notes'][name]}")
    lines.append("  not counted: allocator caching, CUDA context / workspaces, data loader, the torch import")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the search


def _largest_fitting(mm: MemoryModel, budget: int, high: int) -> int:
    lo, hi = 0, high  # invariant: predict(lo) fits (or lo = 0), predict(hi + 1) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mm.predict(mid)["total"] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def measure_step(cfg: Config, batch: int, micro_batch: int | None, device: torch.device | str = "cpu") -> int:
    """Peak bytes (``LiveBytes``) of building the model and running two real training steps
    (forward, loss, backward, AdamW step) at ``batch`` synthetic samples, on one process."""
    from clipkit.losses import build_loss
    from clipkit.models import build_model
    from clipkit.training.gradcache import grad_cache_step
    from clipkit.training.optim import build_optimizer

    device = torch.device(device)
    with LiveBytes() as mem:
        model = build_model(cfg.model).to(device)
        if cfg.train.grad_checkpointing:
            apply_grad_checkpointing(model)
        loss_fn = build_loss(cfg.loss).to(device)
        if hasattr(loss_fn, "attach"):  # as the training loop does (albef_md's momentum model)
            loss_fn.attach(model)
        optimizer = build_optimizer(model, cfg.model, cfg.optim, extra=loss_fn)
        model.train()
        data = synthetic_batch(model, cfg, batch, _feature_cache_applies(cfg, model), device)
        autocast = lambda: _autocast(cfg.train.precision, device)
        for _ in range(2):  # AdamW creates its moments in the first step: the second is the steady one
            if micro_batch:
                grad_cache_step(model, loss_fn, data, micro_batch, autocast=autocast)
            else:
                with autocast():
                    out = model(data)
                loss_fn(out, data)["loss"].backward()
                del out
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del model, loss_fn, optimizer, data
    return mem.peak


def find_batch_size(
    cfg: Config,
    budget_bytes: int,
    *,
    world_size: int = 1,
    micro_batch: int | None = None,
    verify: bool = True,
    max_batch: int = 2**22,
    tries: int = 4,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Largest per-rank batch whose step fits ``budget_bytes`` per device.

    The prediction (``MemoryModel``) is searched first. With ``verify`` (one process only)
    real steps are then measured (``measure_step``, at most ``tries``): each next batch is
    where the line through the last two measurements (the first: through the prediction's
    slope) reaches 97% of the budget, kept between the largest batch measured to fit and
    the smallest measured not to. Returns the largest batch measured to fit. On the CPU the
    budget must leave room in the memory available now. Raises when not even 1 sample fits.
    """
    log = log or (lambda _: None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mm = MemoryModel.measure(cfg, world_size, micro_batch)
    b = _largest_fitting(mm, budget_bytes, max_batch)
    if b < 1:
        need = mm.predict(1)["total"]
        raise ClipkitError(
            f"not even a batch of 1 fits {budget_bytes / GiB:.2f} GiB: the model and optimizer alone "
            f"need about {need / GiB:.2f} GiB"
        )
    log(f"predicted: batch {b:,} ({mm.predict(b)['total'] / GiB:.2f} GiB of {budget_bytes / GiB:.2f})")
    if not verify or world_size > 1:
        if verify:
            log("not verified: a real step with several ranks needs one process per rank")
        return b
    if device.type == "cpu":
        _check_room(budget_bytes)
    fits, fails = 0, max_batch + 1  # largest batch measured to fit, smallest measured not to
    slope = (mm.predict(b)["total"] - mm.predict(max(1, b // 2))["total"]) / max(1, b - b // 2)
    last: tuple[int, int] | None = None
    for _ in range(tries):
        peak = measure_step(cfg, b, micro_batch if micro_batch and micro_batch < b else None, device)
        log(f"measured: batch {b:,} peaks at {peak / GiB:.2f} GiB")
        if peak <= budget_bytes:
            fits = max(fits, b)
        else:
            fails = min(fails, b)
        if last is not None and last[0] != b and peak != last[1]:
            slope = max((peak - last[1]) / (b - last[0]), 1.0)
        last = (b, peak)
        target = b + int((0.97 * budget_bytes - peak) / max(slope, 1.0))
        target = min(max(target, fits + 1), fails - 1)
        if target == b or fits + 1 >= fails or (peak <= budget_bytes and peak >= 0.9 * budget_bytes):
            break
        b = target
    if fits < 1:
        raise ClipkitError(f"no batch was measured to fit {budget_bytes / GiB:.2f} GiB (last tried {b:,})")
    return fits


def _check_room(budget_bytes: int) -> None:
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return
    if budget_bytes > 0.8 * avail:
        raise ClipkitError(
            f"a {budget_bytes / GiB:.2f} GiB budget exceeds 80% of the memory available now "
            f"({avail / GiB:.2f} GiB); verifying it on the CPU could exhaust the machine"
        )


__all__ = [
    "LiveBytes",
    "MemoryModel",
    "estimate_peak_memory",
    "find_batch_size",
    "format_estimate",
    "measure_step",
]
