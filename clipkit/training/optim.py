"""AdamW with parameter groups: per-tower learning rates and no decay where decay is harmful.

Groups (empty ones are dropped), each ``{"name", "params", "lr", "weight_decay"}``:

- ``vision`` / ``text``: the tower's trainable matrices, ``lr * model.<tower>.lr_mult``, decayed;
- ``vision_no_decay`` / ``text_no_decay``: the tower's 1-D params (biases, norm weights), same lr;
- ``head``: projections (and any trainable loss parameter), ``lr * 1``, decayed;
- ``head_no_decay``: their 1-D params and ``logit_scale`` / ``logit_bias``, ``lr * 1``, no decay.

Weight decay on a bias or a norm gain only pulls it towards 0 (a norm gain of 0 kills the
feature); on the temperature it would drag the learned scale down. Frozen parameters
(``requires_grad=False``, e.g. a locked tower) are never given to the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipkit.config import ModelConfig, OptimConfig

NO_DECAY_NAMES = ("logit_scale", "logit_bias")
TOWERS = ("vision", "text")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or name.split(".")[-1] in NO_DECAY_NAMES


def _group_of(name: str, param: nn.Parameter) -> str:
    tower = name.split(".", 1)[0]
    base = tower if tower in TOWERS else "head"
    return base + ("_no_decay" if _no_decay(name, param) else "")


def param_groups(
    model: nn.Module, model_cfg: ModelConfig, optim_cfg: OptimConfig, extra: nn.Module | None = None
) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model`` (plus ``extra``'s trainable params, e.g. a loss, in the head).

    Top-level submodule names decide the tower: ``vision.*`` and ``text.*`` get that tower's
    ``lr_mult``; everything else (``vision_proj``, ``text_proj``, ``logit_scale``, ...) is head.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if extra is not None:
        named += [(f"loss.{n}", p) for n, p in extra.named_parameters() if p.requires_grad]
    mult = {"vision": model_cfg.vision.lr_mult, "text": model_cfg.text.lr_mult, "head": 1.0}
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in named:
        buckets.setdefault(_group_of(name, p), []).append((name, p))
    order = [f"{t}{s}" for t in (*TOWERS, "head") for s in ("", "_no_decay")]
    groups = []
    for gname in order:
        if gname not in buckets:
            continue
        members = buckets[gname]
        groups.append(
            {
                "name": gname,
                "params": [p for _, p in members],
                "param_names": [n for n, _ in members],
                "lr": optim_cfg.lr * mult[gname.split("_", 1)[0]],
                "weight_decay": 0.0 if gname.endswith("_no_decay") else optim_cfg.weight_decay,
            }
        )
    if not groups:
        raise ValueError(
            "the model has no trainable parameters: every tower is locked and there is no projection "
            "or logit scale to learn; unlock layers (model.<tower>.unlocked_layers) or add a projection"
        )
    return groups


def adamw_implementation(choice: str, params: list[torch.Tensor], scaler: bool) -> str:
    """``optim.implementation`` for these parameters: "fused", "foreach" or "for_loop".

    The three run the same AdamW update (equal up to float rounding). ``auto`` takes fused (one
    kernel: on a CPU several times faster than torch's default per-parameter loop) unless a
    gradient scaler runs the step (``scaler``, fp16): a fused step skips an overflowing update
    inside its kernel, where accelerate cannot see the skip, so fp16 takes foreach.
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = {p.device.type for p in params}
    fusable = devices <= set(_get_fused_kernels_supported_devices()) and all(
        p.is_floating_point() for p in params
    )
    if choice == "auto":
        return "fused" if fusable and not scaler else "foreach"
    if choice == "fused" and scaler:
        raise ValueError(
            "optim.implementation=fused with train.precision=fp16: the gradient scaler's skipped steps "
            "would go unseen; use optim.implementation=foreach (or auto)"
        )
    if choice == "fused" and not fusable:
        raise ValueError(
            f"optim.implementation=fused: torch {torch.__version__} has no fused AdamW for parameters "
            f"on {', '.join(sorted(devices))}; use optim.implementation=foreach (or auto)"
        )
    return choice


def build_optimizer(
    model: nn.Module,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    extra: nn.Module | None = None,
    scaler: bool = False,
) -> torch.optim.AdamW:
    """AdamW over ``param_groups(...)``; each group keeps its ``name`` and ``param_names``.

    ``scaler``: an fp16 gradient scaler will run the step (``adamw_implementation``).
    """
    groups = param_groups(model, model_cfg, optim_cfg, extra)
    params = [p for g in groups for p in g["params"]]
    impl = adamw_implementation(optim_cfg.implementation, params, scaler)
    kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(groups, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps, **kind)


def implementation_of(optimizer: torch.optim.Optimizer) -> str:
    """ "fused", "foreach" or "for_loop": how ``optimizer`` (an AdamW) runs its update."""
    d = optimizer.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for_loop"


def group_summary(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per group: name, tensor count, trainable parameter count, lr, weight decay."""
    return [
        {
            "name": g.get("name", f"group{i}"),
            "tensors": len(g["params"]),
            "params": sum(p.numel() for p in g["params"]),
            "lr": g.get("initial_lr", g["lr"]),
            "weight_decay": g["weight_decay"],
            "update": implementation_of(optimizer),
        }
        for i, g in enumerate(optimizer.param_groups)
    ]


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = [f"  {'group':<16}{'tensors':>8}{'params':>14}{'lr':>11}{'wd':>7}"]
    for r in rows:
        lines.append(
            f"  {r['name']:<16}{r['tensors']:>8}{r['params']:>14,}{r['lr']:>11.2e}{r['weight_decay']:>7.3g}"
        )
    lines.append(f"  {'total':<16}{sum(r['tensors'] for r in rows):>8}{sum(r['params'] for r in rows):>14,}")
    if rows and rows[0].get("update"):
        lines.append(f"  AdamW update: {rows[0]['update']} (optim.implementation)")
    return "\n".join(lines)
