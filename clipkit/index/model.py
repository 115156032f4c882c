"""``--model SPEC`` -> a model with ``image_transform``, ``encode_image``, ``tokenize``, ``encode_text``.

SPEC is one of:

* a run folder (``runs/lit_emoji``): its ``config.yaml`` and newest good checkpoint;
* a checkpoint file (``runs/lit_emoji/checkpoints/step_00000375.pt``): model config inside it;
* a recipe (``train/lit_emoji.yaml``): towers as the recipe says, projection heads untrained
  (seeded, so the same recipe always gives the same embeddings);
* ``package.module:function``: any factory returning an object with the four methods.

``load_model`` returns the model and a SPEC that reloads exactly it (a run folder resolves to
its checkpoint file), which exports and indexes record so queries use the same model.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from clipkit.errors import ClipkitError

METHODS = ("image_transform", "encode_image", "tokenize", "encode_text")


class ModelSpecError(ClipkitError, ValueError):
    """A --model value that names no usable model."""


def _from_recipe(path: Path, overrides: list[str]) -> Any:
    import torch

    from clipkit.config import load_config
    from clipkit.models import build_model

    cfg = load_config(path, overrides)
    torch.manual_seed(0)  # untrained heads of a recipe: the same every time
    return build_model(cfg.model)


def load_model(spec: str, overrides: list[str] | None = None) -> tuple[Any, str]:
    """(model in eval mode, reloadable spec); see the module docstring for SPEC."""
    overrides = list(overrides or [])
    path = Path(spec)
    if path.is_dir() or (path.suffix == ".pt" and path.is_file()):
        from clipkit.training.load import load_trained

        if overrides:
            raise ModelSpecError("--override applies to a recipe .yaml; a checkpoint holds its own config")
        model, _, file = load_trained(path)
        resolved = str(file.resolve())
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        model, resolved = _from_recipe(path, overrides), str(path.resolve())
    elif re.fullmatch(r"[\w.]+:\w+", spec):
        module, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ModelSpecError(f"--model {spec}: cannot import it ({e})") from None
        model, resolved = factory(), spec
    else:
        raise ModelSpecError(
            f"--model {spec!r} is not a run folder, a checkpoint .pt, a recipe .yaml or module:function"
        )
    missing = [m for m in METHODS if not callable(getattr(model, m, None))]
    if missing:
        raise ModelSpecError(f"--model {spec}: the model lacks {', '.join(missing)}")
    if hasattr(model, "eval"):
        model.eval()
    return model, resolved
