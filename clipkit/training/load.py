"""Load a trained model from a run folder or a checkpoint file, for evaluation and export."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from clipkit.config import Config, from_dict
from clipkit.training import checkpoint as ckpt


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest good checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        found = ckpt.latest(path)
        if found is None:
            raise ckpt.CheckpointError(
                f"run folder '{path}' has no good checkpoint under checkpoints/; "
                "train it first (clipkit train ...) or pass a checkpoint file"
            )
        return found
    if not path.exists():
        raise ckpt.CheckpointError(f"'{path}' is neither a run folder nor a checkpoint file")
    return path


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
