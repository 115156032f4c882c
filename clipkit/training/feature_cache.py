"""The locked-tower feature cache: run a frozen vision tower over the shards once, then train from disk.

In LiT-style training (locked image tower, deterministic eval transform) the tower's output for
a sample never changes, yet a plain loop decodes, resizes and pushes every image through it on
every epoch, which is nearly all the compute. Here the outputs are computed once and stored
beside the shards::

    <shard_dir>/_clipkit_cache/<tower fingerprint>/features-000000.npy  (N_0, F) float16
    <shard_dir>/_clipkit_cache/<tower fingerprint>/features-000001.npy  (N_1, F) (a later append)
    <shard_dir>/_clipkit_cache/<tower fingerprint>/keys.json  {"keys": [...], "parts": [...], "absent": [...]}

- Keyed by sample key (``__key__``, which must be unique across the shards) and by
  ``tower.fingerprint()`` (spec + transform settings + every weight): other weights give another
  folder. New samples are computed incrementally into a new part file (old parts are never
  rewritten); ``absent`` lists keys the pipeline skipped (bad images), so they are not retried
  on every start (delete the folder to retry them).
- float16: pooled features of a frozen backbone are O(1..10) and fp16 keeps ~3.3 significant
  digits (relative error <= 2**-11), far below the noise of training a projection on them,
  while halving disk and page-cache use. A part whose values overflow fp16 (|x| > 65504) is
  stored as float32 instead (its dtype is in ``keys.json``). ``get`` always returns float32.
- Writes are atomic and ordered: a part file first, then ``keys.json`` naming it. A build is
  saved every ``FLUSH_ROWS`` new rows, so a killed build keeps what it had saved. If the shard
  folder is read-only the cache goes to ``<run_dir>/feature_cache/<fingerprint>/`` (seeded from
  any cache there is beside the shards).
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
from clipkit.models.inference import bulk_inference
from clipkit.training.stream import split_inputs

CACHE_DIRNAME = "_clipkit_cache"
FP16_MAX = float(np.finfo(np.float16).max)
BUILD_BATCH = 64
FLUSH_ROWS = 50_000  # new rows computed between two saves of the cache


class FeatureCache:
    """Read side, for ``build_loader(feature_lookup=...)``: ``key in cache``, ``cache.get(key)``.

    Parts are memory-mapped on first use; pickling (into loader workers) carries only the
    folder and keys, each worker maps the files itself.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "keys.json"
        self.meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.keys: list[str] = list(self.meta.get("keys", []))
        self.parts: list[dict[str, Any]] = list(self.meta.get("parts", []))  # {"file", "rows", "dtype"}
        self.absent: set[str] = set(self.meta.get("absent", []))
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._starts = np.cumsum([0] + [p["rows"] for p in self.parts])[:-1]  # first row of each part
        if sum(p["rows"] for p in self.parts) != len(self.keys):
            raise ClipkitError(
                f"feature cache {self.folder} is damaged: keys.json lists {len(self.keys)} keys for "
                f"{sum(p['rows'] for p in self.parts)} rows; delete the folder to rebuild it"
            )
        self._maps: list[np.ndarray] | None = None

    def _parts(self) -> list[np.ndarray]:
        if self._maps is None:
            maps = [np.load(self.folder / p["file"], mmap_mode="r") for p in self.parts]
            for part, rows in zip(self.parts, maps):
                if rows.shape[0] != part["rows"]:
                    raise ClipkitError(
                        f"feature cache {self.folder} is damaged: {part['file']} has {rows.shape[0]} rows, "
                        f"keys.json says {part['rows']}; delete the folder to rebuild it"
                    )
            self._maps = maps
        return self._maps

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> np.ndarray:
        """(F,) float32 copy of the cached tower output for ``key`` (KeyError when absent)."""
        i = self._index[key]
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return np.array(self._parts()[part][i - self._starts[part]], dtype=np.float32)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}


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
    bar: tqdm,
    precision: str = "fp32",
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
    try:
        with torch.inference_mode(), bulk_inference(model.vision, precision) as prep:
            for batch in loader:
                inputs, meta = split_inputs(batch)  # the keys find the rows; only images reach the tower
                pick = [i for i, k in enumerate(meta.keys) if k in wanted and k not in found]
                if not pick:
                    continue
                images = prep(inputs["image"][pick].to(device, non_blocking=True))  # (b, 3, H, W)
                feats = model.tower_features(images).float().cpu().numpy()  # (b, F)
                for row, i in enumerate(pick):
                    found[meta.keys[i]] = feats[row]
                bar.update(len(pick))
    finally:
        model.train(was_training)
    return found


def _chunks(todo: list[Path], per_shard: dict[Path, list[str]], missing: set[str]) -> list[list[Path]]:
    """Consecutive groups of shards holding >= FLUSH_ROWS missing keys (the last group fewer)."""
    groups: list[list[Path]] = [[]]
    count = 0
    for shard in todo:
        if count >= FLUSH_ROWS:
            groups.append([])
            count = 0
        groups[-1].append(shard)
        count += sum(k in missing for k in per_shard[shard])
    return groups


def _append(
    folder: Path, old: FeatureCache, new: dict[str, np.ndarray], absent: set[str], meta: dict[str, Any]
) -> FeatureCache:
    """``old`` plus ``new`` rows as one more part file; the part is written before ``keys.json``."""
    parts, keys = list(old.parts), list(old.keys)
    if new:
        rows = np.stack(list(new.values()))  # (n, F)
        dtype = np.float16 if np.all(np.abs(rows) <= FP16_MAX) else np.float32
        name = f"features-{len(parts):06d}.npy"
        with atomic_open(folder / name, "wb") as f:
            np.save(f, rows.astype(dtype))
        parts.append({"file": name, "rows": len(rows), "dtype": np.dtype(dtype).name})
        keys += list(new)
    index = {**meta, "dim": int(rows.shape[1]) if new else old.meta.get("dim", 0), "parts": parts}
    atomic_write_text(folder / "keys.json", json.dumps({**index, "keys": keys, "absent": sorted(absent)}))
    return FeatureCache(folder)


def build_feature_cache(
    model: Any,
    data_cfg: DataConfig,
    urls: str,
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    progress: bool = True,
    precision: str = "fp32",
) -> tuple[FeatureCache, str]:
    """Cache ``model.tower_features`` for every sample of ``urls``; returns (cache, one-line report).

    Only keys missing from an existing cache of the same tower fingerprint are computed, and
    only the shards holding them are read. ``precision="bf16"`` computes under bf16 autocast
    (``clipkit.models.inference``) into a cache of its own (fingerprint suffix ``-bf16``).
    """
    shards = shard_paths(urls)
    fingerprint = model.vision.fingerprint() + ("" if precision == "fp32" else f"-{precision}")
    read_from, write_to, note = cache_folders(shards, fingerprint, Path(run_dir))
    old = FeatureCache(write_to if (write_to / "keys.json").is_file() else read_from)
    per_shard = scan_keys(shards)
    known = set(old.keys) | old.absent
    missing = {k for keys in per_shard.values() for k in keys if k not in known}
    if not missing:
        where = f"{old.folder}" + (f" ({note})" if note and old.folder == write_to else "")
        return old, f"{len(old)} samples cached in {where}, nothing to compute"
    todo = [s for s, keys in per_shard.items() if any(k in missing for k in keys)]
    meta = {"fingerprint": fingerprint, "tower": getattr(model.vision, "spec", ""), "version": 1}
    write_to.mkdir(parents=True, exist_ok=True)
    reused, computed, t0 = len(old), 0, time.perf_counter()
    bar = tqdm(total=len(missing), desc="feature cache", unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        for group in _chunks(todo, per_shard, missing):  # saved after each group: a kill loses one group
            new = _compute(model, data_cfg, group, missing, torch.device(device), bar, precision)
            group_keys = {k for shard in group for k in per_shard[shard] if k in missing}
            old = _append(write_to, old, new, old.absent | (group_keys - set(new)), meta)
            computed += len(new)
    took = time.perf_counter() - t0
    report = (
        f"{len(old)} samples cached in {write_to}: {computed} computed now "
        f"({computed / max(took, 1e-9):.0f} img/s), {reused} reused"
        + (f", {len(old.absent)} unreadable" if old.absent else "")
        + (f"; {note}" if note else "")
    )
    return old, report
