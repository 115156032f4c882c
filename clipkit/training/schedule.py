"""Linear warmup, then cosine decay to ``min_lr_ratio * lr``, as a ``LambdaLR``.

``s`` counts optimizer steps already taken (the scheduler's ``last_epoch``); the update
number ``s + 1`` uses ``lr * factor(s)``::

    factor(s) = (s + 1) / warmup                                        s < warmup
    factor(s) = m + (1 - m) * (1 + cos(pi * min(1, (s - warmup) / (total - warmup)))) / 2

with ``m = min_lr_ratio``. The first update uses ``lr / warmup`` (never 0), the last warmup
update uses the full ``lr``, and past ``total`` the factor stays at ``m``. The factor
multiplies each group's own base lr, so per-tower multipliers are kept. The scheduler's
state (step count, base lrs) goes into checkpoints; the shape is recomputed from the config.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from clipkit.config import OptimConfig


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for the update that follows ``step`` completed steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """The warmup-cosine ``LambdaLR`` for a run of ``total_steps`` optimizer steps."""
    if cfg.warmup_steps < 0 or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(
            f"optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]; "
            f"got {cfg.warmup_steps} and {cfg.min_lr_ratio}"
        )
    # A partial (not a lambda) so LambdaLR.state_dict() saves nothing of the shape: on resume
    # the schedule follows the current config, the step count comes from the checkpoint.
    fn = functools.partial(lr_factor, warmup=cfg.warmup_steps, total=total_steps, min_ratio=cfg.min_lr_ratio)
    return LambdaLR(optimizer, fn)
