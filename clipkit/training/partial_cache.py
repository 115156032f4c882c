"""The partial feature cache: a locked vision tower whose top layers train, trained from disk.

With ``model.vision.locked=true`` and ``unlocked_layers=k`` the bottom of the tower (every layer
below the top ``k``) is frozen and runs in eval mode, so its output for a sample never changes,
though the tower's own output does. Here that output, the activations entering the top ``k``
layers, is computed once per sample and stored; training runs only the top layers, pooling and
head on it (``DualEncoder.encode_image(image_activations=...)``, batch key ``"image_activations"``)::

    <shard_dir>/_clipkit_cache/partial-<key>/features-000000.npy  (N_0, *S) float16 (the header has S)
    <shard_dir>/_clipkit_cache/partial-<key>/keys.json  {"keys": [...], "parts": [...], ...}

- The storage, incremental builds, atomic writes and read-only fallback are the feature cache's
  (``clipkit.training.feature_cache``); only what is computed differs: ``Tower.split_at(k)``
  cuts the tower's forward at the layer boundary, ``bottom`` fills the cache, ``top`` trains.
  ``S`` is e.g. (320, 5, 5) for EfficientNet-Lite0 at 160 px entering its head (k=1), or
  (1 + patches, width) tokens for a ViT. With ``train.cache_views=K`` (an augmenting tower) each
  key holds K views, (N_i, K, *S), and training draws one per sample, as the feature cache does.
- Key: the tower fingerprint without the top ``k`` layers' weights (``Tower.fingerprint(skip_top=
  k)``: the spec, the transform and every frozen weight), ``k`` and the split point. A resumed run
  (its top layers trained) finds its cache; other frozen weights or another ``k`` get another.
- Same computation as the uncached run: the bottom runs in eval mode in both (``Tower.lock``
  pins the locked part in eval mode), and the top layers run in the modes ``lock`` gives them
  (BatchNorm in eval mode, LiT style; dropout live in train mode). Activations are stored in
  float16 (relative error <= 2**-11, as the feature cache's pooled features); a part that
  overflows float16 is stored as float32.
- Activations are larger than pooled features: the plan prints the estimated size, and a cache
  estimated above ``train.partial_cache_max_gb`` is not built (the run trains without a cache,
  saying why). A tower kind that cannot be cut (``NoSplit``) trains without a cache likewise.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from clipkit.config import Config, DataConfig
from clipkit.models.tower_base import NoSplit, Tower, TowerSplit
from clipkit.training.feature_cache import (
    CacheJob,
    FeatureCache,
    build_cache,
    cache_fingerprint,
    scan_keys,
    shard_paths,
)

FP16_BYTES = 2


class PartialCache(FeatureCache):
    """Read side (``build_loader(feature_lookup=...)``): ``get(key)`` -> (*S,) float32 activations
    entering the top layers; batches carry them as ``"image_activations"`` (B, *S)."""

    batch_key = "image_activations"

    @property
    def shape(self) -> tuple[int, ...]:
        """S, one view's activation shape (each part's ``.npy`` header records (N_i, [K,] *S))."""
        return tuple(self._parts()[0].shape[2 if self.views > 1 else 1 :]) if self.parts else ()


def partial_fingerprint(tower: Tower, split: TowerSplit) -> str:
    """Key of a partial cache: the tower without its top layers' weights, ``k`` and the split point."""
    k = split.unlocked_layers
    key = f"{tower.fingerprint(skip_top=k)}|unlocked={k}|at={split.at}"
    return "partial-" + hashlib.sha256(key.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- when, and how large


def why_not_partial(cfg: Config, model: Any) -> str | None:
    """Reason the activations entering the vision tower's unlocked top layers cannot be cached."""
    vision = cfg.model.vision
    if not cfg.train.feature_cache:
        return "train.feature_cache=false"
    if not vision.locked:
        return "the vision tower trains (model.vision.locked=false)"
    if not vision.unlocked_layers:
        return "no unlocked top layers (model.vision.unlocked_layers=0)"
    if not model.vision.deterministic_transform and cfg.train.cache_views <= 1:
        return "the vision tower trains on a random (augmenting) transform (train.cache_views=K caches views)"
    try:
        model.vision.split_at(vision.unlocked_layers)
    except NoSplit as err:
        return str(err)
    return None


@torch.no_grad()
def activation_shape(model: Any, split: TowerSplit) -> tuple[int, ...]:
    """S: the shape of one sample's activations entering the top layers (one blank image through
    the eval transform and the bottom, in eval mode)."""
    from PIL import Image

    image = model.image_transform(train=False)(Image.new("RGB", (64, 64)))  # (3, H, W)
    device = next(model.vision.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return tuple(split.bottom(image[None].to(device)).shape[1:])
    finally:
        model.train(was_training)


def estimate_bytes(n_samples: int, shape: tuple[int, ...], views: int = 1) -> int:
    """Size of a float16 cache of ``views`` activations of ``shape`` per sample."""
    return n_samples * max(1, views) * math.prod(shape) * FP16_BYTES


# ---------------------------------------------------------------------------- building


def build_partial_cache(
    model: Any,
    data_cfg: DataConfig,
    urls: str,
    run_dir: str | Path,
    unlocked_layers: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    precision: str = "fp32",
    views: int = 1,
) -> tuple[PartialCache, str]:
    """Cache the activations entering the top ``unlocked_layers`` layers of ``model.vision`` for
    every sample of ``urls`` (``views`` > 1: of that many views of each, as the feature cache's
    ``train.cache_views``); returns (cache, one-line report). Incremental, as the feature cache."""
    split = model.vision.split_at(unlocked_layers)
    base = partial_fingerprint(model.vision, split)
    job = CacheJob(
        model, split.bottom, cache_fingerprint(model.vision, precision, views, base), views, precision
    )
    cache, report = build_cache(job, data_cfg, urls, run_dir, device, progress)
    return PartialCache(cache.folder), report


def partial_or_off(cfg: Config, model: Any, run_dir: Path, acc: Any, reason: str) -> tuple[Any, str]:
    """The training loop's cache when the feature cache does not apply (``reason``): the partial
    cache when the vision tower is locked but for its top layers, else None; and the plan's note."""
    if not cfg.model.vision.unlocked_layers:
        return None, f"off ({reason})"
    k = cfg.model.vision.unlocked_layers
    why = why_not_partial(cfg, model)
    if why:
        return None, f"off ({reason}; no partial cache: {why})"
    split = model.vision.split_at(k)
    shape = activation_shape(model, split)
    n = sum(len(keys) for keys in scan_keys(shard_paths(cfg.data.train)).values())
    views = max(1, cfg.train.cache_views)
    size_gb = estimate_bytes(n, shape, views) / 1e9
    count = f"{n} x {views} views" if views > 1 else f"{n}"
    what = (
        f"activations entering the top {k} layers ({split.at}...): {count} x {shape} fp16 = {size_gb:.2f} GB"
    )
    if size_gb > cfg.train.partial_cache_max_gb:
        return None, (
            f"off ({reason}; no partial cache: {what}, over train.partial_cache_max_gb="
            f"{cfg.train.partial_cache_max_gb:g}; raise it or unlock fewer layers)"
        )
    with acc.main_process_first():  # rank 0 computes, the others then find it complete
        cache, report = build_partial_cache(
            model,
            cfg.data,
            cfg.data.train,
            run_dir,
            k,
            acc.device,
            progress=acc.is_local_main_process,
            precision=cfg.train.feature_cache_precision,
            views=cfg.train.cache_views,
        )
    return cache, f"partial, {what}: {report}"
