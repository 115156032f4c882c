"""The locked-tower feature cache: run a frozen vision tower over the shards once, then train from disk.

In LiT-style training (locked image tower, deterministic eval transform) the tower's output for
a sample never changes, yet a plain loop decodes, resizes and pushes every image through it on
every epoch, which is nearly all the compute. Here the outputs are computed once and stored
beside the shards::

    <shard_dir>/_clipkit_cache/<tower fingerprint>/features.npy   (N, F) float16, row i = keys[i]
    <shard_dir>/_clipkit_cache/<tower fingerprint>/keys.json      {"keys": [...], "absent": [...], ...}

- Keyed by sample key (``__key__``, which must be unique across the shards) and by
  ``tower.fingerprint()`` (spec + transform settings + every weight): other weights give another
  folder; new samples are computed incrementally and appended; ``absent`` lists keys the
  pipeline skipped (bad images), so they are not retried on every start.
- float16: pooled features of a frozen backbone are O(1..10) and fp16 keeps ~3.3 significant
  digits (relative error <= 2**-11), far below the noise of training a projection on them,
  while halving disk and page-cache use. A tower whose outputs overflow fp16 (|x| > 65504) is
  stored as float32 instead (recorded in ``keys.json``). ``get`` always returns float32.
- Writes are atomic (features first, then keys; a reader trusts only the rows ``keys.json``
  lists, so an interrupted append never exposes a torn row). If the shard folder is read-only
  the cache goes to ``<run_dir>/feature_cache/<fingerprint>/`` (seeded from any cache there is
  beside the shards).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from clipkit.config import Config, DataConfig
from clipkit.data.atomic import atomic_open, atomic_write_text
from clipkit.data.tario import iter_samples
from clipkit.data.urls import expand_urls, is_local
from clipkit.errors import ClipkitError

CACHE_DIRNAME = "_clipkit_cache"
FP16_MAX = float(np.finfo(np.float16).max)
BUILD_BATCH = 64


class FeatureCache:
    """Read side, for ``build_loader(feature_lookup=...)``: ``key in cache``, ``cache.get(key)``.

    Rows are memory-mapped; pickling (into loader workers) carries only the folder and keys,
    each worker maps the file itself.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "keys.json"
        self.meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.keys: list[str] = list(self.meta.get("keys", []))
        self.absent: set[str] = set(self.meta.get("absent", []))
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._rows: np.ndarray | None = None

    @property
    def rows(self) -> np.ndarray:
        """(len(self), F) memory map; rows past ``len(keys)`` (a torn append) are never used."""
        if self._rows is None:
            self._rows = np.load(self.folder / "features.npy", mmap_mode="r")
            if len(self._rows) < len(self.keys):
                raise ClipkitError(
                    f"feature cache {self.folder} is damaged: keys.json lists {len(self.keys)} samples "
                    f"but features.npy has {len(self._rows)} rows; delete the folder to rebuild it"
                )
        return self._rows

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> np.ndarray:
        """(F,) float32 copy of the cached tower output for ``key`` (KeyError when absent)."""
        return np.array(self.rows[self._index[key]], dtype=np.float32)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows": None}


# ---------------------------------------------------------------------------- when and where


def why_not_cached(cfg: Config, model: Any) -> str | None:
    """Reason the vision tower's features cannot be cached for this run, or None when they can."""
    vision = cfg.model.vision
    if not cfg.train.feature_cache:
        return "train.feature_cache=false"
    if not vision.locked:
        return "the vision tower trains (model.vision.locked=false)"
    if vision.unlocked_layers:
        return f"model.vision.unlocked_layers={vision.unlocked_layers} (its top layers train)"
    if not model.image_features_cacheable:
        return "the vision tower trains on a random (augmenting) transform"
    return None


def shard_paths(urls: str) -> list[Path]:
    """Local shard files of a shard spec (braces, '::' lists, folders); remote specs raise."""
    found = expand_urls(urls)
    remote = [u for u in found if not is_local(u)]
    if remote:
        raise ClipkitError(
            f"the feature cache reads local shard files, but '{remote[0]}' is remote; "
            "copy the shards locally or set train.feature_cache=false"
        )
    return [Path(u.removeprefix("file:")).expanduser() for u in found]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def cache_folders(shards: list[Path], fingerprint: str, run_dir: Path) -> tuple[Path, Path, str]:
    """(folder to read an existing cache from, folder to write to, note)."""
    beside = shards[0].parent / CACHE_DIRNAME / fingerprint
    if _writable(beside):
        return beside, beside, ""
    fallback = run_dir / "feature_cache" / fingerprint
    return beside, fallback, f"shard folder {shards[0].parent} is read-only; cache kept in {fallback}"


# ---------------------------------------------------------------------------- building


def scan_keys(shards: list[Path]) -> dict[Path, list[str]]:
    """Sample keys of each shard from the tar headers alone (no member is read)."""
    out: dict[Path, list[str]] = {}
    first_seen: dict[str, Path] = {}
    for shard in shards:
        with open(shard, "rb") as f:
            keys = [s["__key__"] for s in iter_samples(f, want=lambda ext: False) if isinstance(s, dict)]
        for key in keys:
            if key in first_seen:
                raise ClipkitError(
                    f"sample key '{key}' is in both {first_seen[key]} and {shard}; the feature cache "
                    "needs keys unique across shards (rebuild the shards, or set train.feature_cache=false)"
                )
            first_seen[key] = shard
        out[shard] = keys
    return out


def _compute(
    model: Any,
    data_cfg: DataConfig,
    shards: list[Path],
    wanted: set[str],
    device: torch.device,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Tower features of the ``wanted`` keys, reading ``shards`` in order with the data pipeline."""
    from clipkit.data import build_loader

    cfg = dataclasses.replace(data_cfg, batch_size=BUILD_BATCH, shuffle_buffer=0)
    loader = build_loader(
        cfg,
        "::".join(str(s) for s in shards),
        model.image_transform(train=False),
        model.tokenize,
        train=False,
        seed=0,
        rank=0,
        world_size=1,
    )
    found: dict[str, np.ndarray] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(wanted), desc="feature cache", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for batch in loader:
                pick = [i for i, k in enumerate(batch["key"]) if k in wanted and k not in found]
                if not pick:
                    continue
                images = batch["image"][pick].to(device, non_blocking=True)  # (b, 3, H, W)
                feats = model.tower_features(images).float().cpu().numpy()  # (b, F)
                for row, i in enumerate(pick):
                    found[batch["key"][i]] = feats[row]
                bar.update(len(pick))
    finally:
        bar.close()
        model.train(was_training)
    return found


def _write(
    folder: Path, old: FeatureCache, new: dict[str, np.ndarray], absent: set[str], meta: dict[str, Any]
) -> None:
    """Append ``new`` rows to ``old``'s into ``folder`` (features, then keys; both atomic)."""
    new_keys = list(new)
    new_rows = np.stack([new[k] for k in new_keys]) if new_keys else None
    dim = new_rows.shape[1] if new_rows is not None else int(old.meta.get("dim", 0))
    old_dtype = np.dtype(old.meta.get("dtype", "float16"))
    overflow = new_rows is not None and not np.all(np.abs(new_rows) <= FP16_MAX)
    dtype = np.dtype(np.float32) if overflow or old_dtype == np.float32 else np.dtype(np.float16)
    n_old = len(old)
    shape = (n_old + len(new_keys), dim)
    with atomic_open(folder / "features.npy", "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n_old, 65536):  # stream the old rows: the cache may exceed RAM
            f.write(np.ascontiguousarray(old.rows[start : min(n_old, start + 65536)], dtype=dtype).tobytes())
        if new_rows is not None:
            f.write(np.ascontiguousarray(new_rows, dtype=dtype).tobytes())
    keys = {**meta, "dtype": dtype.name, "dim": dim, "keys": old.keys + new_keys, "absent": sorted(absent)}
    atomic_write_text(folder / "keys.json", json.dumps(keys))


def build_feature_cache(
    model: Any,
    data_cfg: DataConfig,
    urls: str,
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[FeatureCache, str]:
    """Cache ``model.tower_features`` for every sample of ``urls``; returns (cache, one-line report).

    Only keys missing from an existing cache of the same tower fingerprint are computed, and
    only the shards holding them are read.
    """
    shards = shard_paths(urls)
    fingerprint = model.vision.fingerprint()
    read_from, write_to, note = cache_folders(shards, fingerprint, Path(run_dir))
    old = FeatureCache(write_to if (write_to / "keys.json").is_file() else read_from)
    per_shard = scan_keys(shards)
    known = set(old.keys) | old.absent
    missing = {k for keys in per_shard.values() for k in keys if k not in known}
    if not missing:
        where = f"{old.folder}" + (f" ({note})" if note and old.folder == write_to else "")
        return old, f"{len(old)} samples cached in {where}, nothing to compute"
    todo = [s for s, keys in per_shard.items() if any(k in missing for k in keys)]
    t0 = time.perf_counter()
    new = _compute(model, data_cfg, todo, missing, torch.device(device), progress)
    absent = old.absent | (missing - set(new))
    meta = {"fingerprint": fingerprint, "tower": getattr(model.vision, "spec", ""), "version": 1}
    write_to.mkdir(parents=True, exist_ok=True)
    _write(write_to, old, new, absent, meta)
    took = time.perf_counter() - t0
    report = (
        f"{len(old) + len(new)} samples cached in {write_to}: {len(new)} computed now "
        f"({len(new) / max(took, 1e-9):.0f} img/s), {len(old)} reused"
        + (f", {len(absent)} unreadable" if absent else "")
        + (f"; {note}" if note else "")
    )
    return FeatureCache(write_to), report
