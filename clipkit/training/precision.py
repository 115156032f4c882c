"""Mixed precision of a training run (``train.precision``) and the optimizer step that honours it.

    fp32  no autocast
    bf16  the model's forward under ``torch.autocast(dtype=bfloat16)`` (accelerate), CPU and GPU;
          no scaler: bf16 has fp32's exponent range, so gradients do not underflow
    auto  bf16 where the hardware computes in it (a GPU with bf16; a CPU with AVX512-BF16 or
          AMX-BF16), else fp32: detected, printed at the start of the run, never assumed
    fp16  the forward under ``torch.autocast(dtype=float16)`` and a gradient scaler: the loss is
          multiplied by the scale before the backward, gradients are unscaled before clipping;
          a step whose gradients overflow (inf / NaN) is skipped by the scaler, which halves its
          scale (and doubles it after 2000 clean steps)

accelerate builds the scaler on CUDA. On CPU it would not (it would silently train in fp32), so
``with_cpu_scaler`` installs ``torch.amp.GradScaler("cpu")`` and switches on accelerate's own
autocast wrapper: the CPU runs the very code path that a GPU runs (scaled backward, unscale in
``clip_grad_norm_``, ``scaler.step`` + ``update`` in the prepared optimizer), which is how the
tests check it. fp16 on a CPU without fp16 instructions is slow: it exists to test the GPU path.

The loop's non-finite guard (``clipkit.training.safety.NonFiniteSteps``) and the scaler split
the work in ``optimizer_step``: a non-finite *loss* is a bad step (skipped, counted, the run
stops after ``train.max_nonfinite_steps`` in a row); overflowing *gradients* with a finite loss
are the scaler's business (skipped, the scale lowered, counted apart as ``scaler_skipped_steps``),
unless the scale has already fallen below ``MIN_SCALE``: then the gradients overflow even
unscaled, lowering the scale cannot help, and the step counts as bad.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from clipkit.config import Config, TrainConfig

# train.precision -> accelerate's mixed_precision.
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

# Keyword arguments of the fp16 gradient scaler, on CPU and GPU (torch's defaults when empty:
# init_scale 2**16, growth_factor 2, backoff_factor 0.5, growth_interval 2000).
SCALER_KWARGS: dict[str, Any] = {}

# Below this scale, overflowing gradients are a bad step, not the scaler's business.
MIN_SCALE = 1.0


# CPU flags (/proc/cpuinfo) of instructions that compute in bf16; without them bf16 autocast on a
# CPU converts to fp32 and back around every matrix product, and is slower than fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux); empty where the file does not exist."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    return {
        flag
        for line in text.splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[1].split()
    }


def auto_precision(flags: set[str] | None = None) -> tuple[str, str]:
    """(precision, reason) for ``train.precision=auto``: bf16 where the hardware computes in it."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "bf16", f"GPU {name} supports bf16"
        return "fp32", f"GPU {name} has no bf16"
    flags = cpu_flags() if flags is None else flags
    have = [f for f in CPU_BF16_FLAGS if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    if have:
        return "bf16", f"CPU has {'+'.join(have)} (torch CPU capability {capability})"
    return "fp32", f"CPU has none of {', '.join(CPU_BF16_FLAGS)} (torch CPU capability {capability})"


def resolve_precision(cfg: Config) -> Config:
    """``cfg`` with ``train.precision=auto`` replaced by what ``auto_precision`` picks (printed once,
    by rank 0); any other value is returned as it is."""
    if cfg.train.precision != "auto":
        return cfg
    precision, reason = auto_precision()
    if os.environ.get("RANK", "0") == "0":
        print(f"train.precision=auto -> {precision}: {reason}", flush=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


def precision_problems(t: TrainConfig) -> list[str]:
    """What is wrong with ``train.precision`` on this machine (empty: nothing; ``auto`` is resolved
    by ``resolve_precision`` before a run starts)."""
    if t.precision == "auto":
        return []
    if t.precision not in MIXED_PRECISION:
        return [f"train.precision must be one of {', '.join(MIXED_PRECISION)}, got {t.precision!r}"]
    if t.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        return [f"train.precision=bf16: the GPU {name} has no bf16 support; use train.precision=fp16 or fp32"]
    return []


def scaler_kwargs_handlers() -> list[Any]:
    """accelerate's kwargs handler carrying ``SCALER_KWARGS`` to the scaler it builds on GPU."""
    from accelerate.utils import GradScalerKwargs

    return [GradScalerKwargs(**SCALER_KWARGS)] if SCALER_KWARGS else []


def with_cpu_scaler(acc: Accelerator) -> Accelerator:
    """fp16 on CPU: give ``acc`` the gradient scaler and autocast that accelerate gives a GPU.

    Call before ``acc.prepare``: ``prepare`` wraps the model's forward in autocast when
    ``native_amp`` is set and hands ``acc.scaler`` to the prepared optimizer.
    """
    if acc.mixed_precision == "fp16" and acc.scaler is None and acc.device.type == "cpu":
        acc.scaler = torch.amp.GradScaler("cpu", **SCALER_KWARGS)
        acc.native_amp = True  # accelerate: autocast(float16) around the prepared model's forward
    if acc.mixed_precision == "fp16" and acc.scaler is None:
        raise RuntimeError(
            f"train.precision=fp16 on {acc.device}: accelerate built no gradient scaler "
            f"(distributed type {acc.distributed_type}); use train.precision=bf16 or fp32"
        )
    return acc


def loss_scale(acc: Accelerator) -> float | None:
    """The fp16 scaler's current scale (None without a scaler)."""
    return float(acc.scaler.get_scale()) if acc.scaler is not None else None


def optimizer_step(
    acc: Accelerator,
    optimizer: Any,
    grad_norm: float,
    losses_finite: bool,
    agree: Callable[[bool], bool],
) -> dict[str, bool]:
    """Step ``optimizer`` (prepared by ``acc``) after ``acc.clip_grad_norm_`` returned ``grad_norm``.

    ``losses_finite``: this rank's losses are finite; ``agree(flag)``: true when ``flag`` is
    true on every rank (a collective with several ranks; called once). Returns
    ``{"updated", "nonfinite", "overflow"}``: the parameters moved; a bad step for the
    non-finite guard; a step the fp16 scaler skipped (its scale lowered). Without a scaler a
    step is bad when its loss or gradient norm is not finite, and nothing moves (the caller
    still advances the schedule and zeroes the gradients).
    """
    scaler = acc.scaler
    if scaler is None:
        ok = agree(losses_finite and math.isfinite(grad_norm))
        if ok:
            optimizer.step()
        return {"updated": ok, "nonfinite": not ok, "overflow": False}
    # With a scaler, every step ends in scaler.update() (it clears the record of this step's
    # unscale_; without it the next unscale_ refuses). Gradients are all-reduced before
    # clipping, so every rank's scaler sees the same inf / NaN and decides alike.
    if not agree(losses_finite):
        scaler.update()  # no parameter change; lowers the scale if the gradients overflowed too
        return {"updated": False, "nonfinite": True, "overflow": False}
    optimizer.step()  # accelerate: scaler.step (skipped on inf / NaN gradients) + scaler.update
    skipped = bool(getattr(optimizer, "step_was_skipped", not math.isfinite(grad_norm)))
    if skipped and scaler.get_scale() < MIN_SCALE:
        return {"updated": False, "nonfinite": True, "overflow": False}
    return {"updated": not skipped, "nonfinite": False, "overflow": skipped}


def scaler_state(acc: Accelerator) -> dict[str, Any] | None:
    """The scaler's state for a checkpoint (scale, growth tracker); None without a scaler."""
    return acc.scaler.state_dict() if acc.scaler is not None else None


def load_scaler_state(acc: Accelerator, state: dict[str, Any] | None) -> None:
    """Restore ``scaler_state``; a checkpoint of another precision leaves the fresh scaler as is."""
    if acc.scaler is not None and state:
        acc.scaler.load_state_dict(state)
