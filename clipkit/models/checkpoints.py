"""Reading checkpoints of a run folder: verified ``latest``, clear errors on load.

Layout: ``<run_dir>/checkpoints/step_00000100.pt`` plus ``step_00000100.json``, the sidecar
``{"file", "size", "sha256", "step", "samples_seen"}``, written after the ``.pt`` (the writing
half lives with the trainer, which re-exports this one). A checkpoint counts only once its
sidecar exists and matches: ``latest()`` skips a ``.pt`` without sidecar, or with a size or
hash mismatch (with a warning), in favour of the previous good one.

The state is a plain dict (the trainer's ``run_state.checkpoint_state``); it holds only
tensors, numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipkit.errors import ClipkitError

STEP_RE = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(ClipkitError):
    """A checkpoint that cannot be used: truncated, corrupt, or from another architecture."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def sidecar_path(ckpt: Path) -> Path:
    return ckpt.with_suffix(".json")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of the run, oldest step first (sidecars not checked)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def problem(ckpt: Path, check_hash: bool = True) -> str | None:
    """Why ``ckpt`` cannot be trusted (missing/unreadable sidecar, size or hash mismatch), or None."""
    side = sidecar_path(ckpt)
    if not side.is_file():
        return "has no sidecar .json (the run was probably killed while saving it)"
    try:
        meta = json.loads(side.read_text())
        size, sha = int(meta["size"]), str(meta["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        return f"has an unreadable sidecar {side.name} ({err})"
    actual = ckpt.stat().st_size
    if actual != size:
        return f"is truncated: {actual} bytes, its sidecar says {size}"
    if check_hash and _file_sha256(ckpt) != sha:
        return "is corrupt: its sha256 differs from the sidecar's"
    return None


def latest(run_dir: str | Path) -> Path | None:
    """Newest checkpoint whose sidecar matches (size and sha256); bad ones are skipped with a warning."""
    skipped: list[str] = []
    found = None
    for ckpt in reversed(list_checkpoints(run_dir)):
        why = problem(ckpt)
        if why is None:
            found = ckpt
            break
        skipped.append(f"{ckpt} {why}")
    fallback = f"falling back to {found}" if found else "no good checkpoint is left"
    for line in skipped:
        warnings.warn(f"skipping checkpoint {line}; {fallback}", stacklevel=2)
    return found


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest good checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(
                f"run folder '{path}' has no good checkpoint under checkpoints/; "
                "train it first (clipkit train ...) or pass a checkpoint file"
            )
        return found
    if not path.exists():
        raise CheckpointError(f"'{path}' is neither a run folder nor a checkpoint file")
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a truncated or corrupt file raises ``CheckpointError`` saying so."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    side = sidecar_path(path)
    if side.is_file():
        why = problem(path, check_hash=False)
        if why is not None:
            raise CheckpointError(f"checkpoint {path} {why}; {_advice()}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes): the file is truncated or "
            f"corrupt ({type(err).__name__}: {first}); {_advice()}"
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a clipkit checkpoint (no 'model' entry)")
    return state


def _advice() -> str:
    return "train.resume=latest falls back to the newest good checkpoint; or delete this file"


def load_model_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, config: dict
) -> None:
    """``model.load_state_dict`` that names what differs when the checkpoint is another architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        m = config.get("model", {})
        was = ", ".join(
            f"model.{k}={m.get(k, {}).get('name') if k in ('vision', 'text') else m.get(k)!r}"
            for k in ("vision", "text", "embed_dim", "projection")
        )
        raise CheckpointError(
            f"checkpoint {source} does not fit this model: {'; '.join(parts)} keys. It comes from another "
            f"architecture: check model.vision.name, model.text.name, model.embed_dim, model.projection and "
            f"model.init_logit_bias against the checkpoint's config ({was})"
        )
    model.load_state_dict(state_dict)
