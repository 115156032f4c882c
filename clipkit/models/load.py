"""Load a trained model from a run folder or a checkpoint file (evaluation, export, indexing, distillation)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from clipkit.config import Config, from_dict
from clipkit.models import checkpoints as ckpt
from clipkit.models.checkpoints import resolve_checkpoint

__all__ = ["load_trained", "resolve_checkpoint"]


def load_trained(path: str | Path) -> tuple[nn.Module, Config, Path]:
    """(model in eval mode, its Config, the checkpoint file used)."""
    from clipkit.models import build_model

    file = resolve_checkpoint(path)
    state = ckpt.load(file)
    if "config" not in state:
        raise ckpt.CheckpointError(f"{file} holds no config: it was not written by clipkit train")
    cfg = from_dict(Config, state["config"])
    model = build_model(cfg.model)
    ckpt.load_model_state(model, state["model"], str(file), state["config"])
    return model.eval(), cfg, file
