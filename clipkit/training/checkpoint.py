"""Writing checkpoints of a run folder: atomic save, pruning, RNG state; reading is in models.

Layout: ``<run_dir>/checkpoints/step_00000100.pt`` plus ``step_00000100.json``, the sidecar
``{"file", "size", "sha256", "step", "samples_seen"}``. The ``.pt`` is written to a temporary
file in the same folder, fsynced and renamed (``clipkit.data.atomic``); the sidecar is written
the same way *after* it. So a checkpoint counts only once its sidecar exists and matches: a
run killed while saving leaves either a stray temporary file or a ``.pt`` without sidecar, and
``latest()`` skips both (with a warning) in favour of the previous good one. With
``train.keep_best``, ``best.pt`` + ``best.json`` (the sidecar plus ``metric`` and ``value``) are
written the same way beside them; ``latest()`` and pruning never touch them.

The state is a plain dict (see ``clipkit.training.run_state.checkpoint_state``); it holds only
tensors, numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``.
Reading (``latest``, ``load``, ``load_model_state``, ...) lives in ``clipkit.models.checkpoints``
(evaluation, indexing and distillation read checkpoints too) and is re-exported here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipkit.data.atomic import atomic_open, atomic_write_text
from clipkit.models.checkpoints import (
    STEP_RE,
    CheckpointError,
    checkpoint_dir,
    latest,
    list_checkpoints,
    load,
    load_model_state,
    problem,
    resolve_checkpoint,
    sidecar_path,
)

__all__ = [
    "STEP_RE",
    "CheckpointError",
    "best_path",
    "capture_rng",
    "checkpoint_dir",
    "checkpoint_path",
    "estimated_size",
    "latest",
    "list_checkpoints",
    "load",
    "load_model_state",
    "problem",
    "prune",
    "read_best",
    "remove_temporaries",
    "resolve_checkpoint",
    "restore_rng",
    "save",
    "save_best",
    "sidecar_path",
    "write_in_progress",
]


class _HashingWriter:
    """File wrapper that hashes and counts what ``torch.save`` writes through it."""

    def __init__(self, f: Any):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def save(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` atomically, then its sidecar; keep the last ``keep_last`` (0 = all)."""
    path = checkpoint_path(run_dir, step)
    _write(path, step, state)
    if keep_last > 0:
        prune(run_dir, keep_last)
    return path


def best_path(run_dir: str | Path) -> Path:
    """``checkpoints/best.pt`` (sidecar ``best.json``); never "latest", never pruned."""
    return checkpoint_dir(run_dir) / "best.pt"


def save_best(run_dir: str | Path, step: int, state: dict[str, Any], metric: str, value: float) -> Path:
    """Write ``best.pt`` atomically, then ``best.json``: the usual sidecar plus metric and value."""
    path = best_path(run_dir)
    _write(path, step, state, {"metric": metric, "value": float(value)})
    return path


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """``best.json`` of a run whose ``best.pt`` matches it (size), else None."""
    path = best_path(run_dir)
    if not path.is_file() or problem(path, check_hash=False) is not None:
        return None
    return json.loads(sidecar_path(path).read_text())


def _write(path: Path, step: int, state: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """``state`` to ``path`` atomically, then its sidecar (+ ``extra`` fields)."""
    try:
        with atomic_open(path, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
        sidecar = {
            "file": path.name,
            "size": writer.size,
            "sha256": writer.sha.hexdigest(),
            "step": step,
            "samples_seen": int(state.get("samples_seen", -1)),
            **(extra or {}),
        }
        atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=1) + "\n")
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        # atomic_open removed its temporary file; a .pt without sidecar would never be "latest"
        # but is dead weight on a full disk.
        path.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write checkpoint {path}: {_os_reason(err)}; nothing was replaced, the last good "
            f"checkpoint is still the latest. Free space in {path.parent} (or move train.output_dir) and "
            "continue with train.resume=latest"
        ) from err


def _os_reason(err: BaseException) -> str:
    while not isinstance(err, OSError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (" (the disk is full)" if err.errno == errno.ENOSPC else "")
    return f"{type(err).__name__}: {err}"


def estimated_size(model: nn.Module) -> int:
    """About the bytes of one checkpoint: the weights plus AdamW's two moments of the trainable ones."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return total + sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)


def remove_temporaries(run_dir: str | Path) -> list[str]:
    """Delete the temporary files of checkpoint writes that a killed run left; returns their names.

    Only call it when no other process writes this run folder (at the start of a run).
    """
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    stale = [
        p for p in folder.iterdir() if p.name.startswith((".step_", ".best.")) and p.name.endswith(".tmp")
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


def write_in_progress(run_dir: str | Path) -> bool:
    """A checkpoint is being written right now: a temporary file, or a ``.pt`` without its sidecar."""
    try:
        names = set(os.listdir(checkpoint_dir(run_dir)))
    except FileNotFoundError:
        return False
    return any(n.endswith(".tmp") or (n.endswith(".pt") and n[:-3] + ".json" not in names) for n in names)


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete checkpoints older than the newest ``keep_last`` that pass the cheap (size) check."""
    ckpts = list_checkpoints(run_dir)
    good = [c for c in ckpts if problem(c, check_hash=False) is None]
    if len(good) <= keep_last:
        return
    oldest_kept = good[-keep_last]
    for ckpt in ckpts:
        if ckpt == oldest_kept:
            break
        sidecar_path(ckpt).unlink(missing_ok=True)  # sidecar first: a lone .pt is never "good"
        ckpt.unlink(missing_ok=True)


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states, as weights_only-loadable values."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}
    rng = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(_tuples(rng["python"]))
    np_state = dict(rng["numpy"])
    np_state["state"] = {
        "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
        "pos": np_state["state"]["pos"],
    }
    np.random.set_state(np_state)
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


def _tuples(x: Any) -> Any:
    # random.setstate wants tuples; a round trip through some loaders yields lists.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
