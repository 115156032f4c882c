"""The locked-tower feature cache: run a frozen vision tower over the shards once, then train from disk.

In LiT-style training (locked image tower, deterministic eval transform) the tower's output for
a sample never changes, yet a plain loop decodes, resizes and pushes every image through it on
every epoch, which is nearly all the compute. Here the outputs are computed once and stored
beside the shards::

    <shard_dir>/_clipkit_cache/<tower fingerprint>/features-000000.npy  (N_0, F) float16
    <shard_dir>/_clipkit_cache/<tower fingerprint>/features-000001.npy  (N_1, F) (a later append)
    <shard_dir>/_clipkit_cache/<tower fingerprint>/keys.json  {"keys": [...], "parts": [...], "absent": [...]}

- Augmented views (``train.cache_views=K`` > 1, ``clipkit.data.augment``): each image goes through
  the tower K times, once: view 0 through the eval transform, views 1..K-1 through the augmented
  training transform, seeded by (``model.vision.augmentation.view_seed``, key, view). Parts are
  then (N_i, K, F) and the folder is ``<tower fingerprint>[-bf16]-views<K>-<settings hash>``: other
  augmentation settings or K give another folder. A training step reads one view per sample,
  drawn from (seed, epoch, key) (``clipkit.data.prepare``); evaluation reads view 0.
- What is cached is general (``CacheJob``): any ``encode(images) -> (n, *shape)`` of the images'
  views (the pooled tower output here; the partial cache stores activations), rows (n, [K,] *shape).
- Keyed by sample key (``__key__``, which must be unique across the shards) and by
  ``tower.fingerprint()`` (spec + transform settings + every weight): other weights give another
  folder. New samples are computed incrementally into a new part file (old parts are never
  rewritten); ``absent`` lists keys the pipeline skipped (bad images), so they are not retried
  on every start (delete the folder to retry them).
- float16: pooled features of a frozen backbone are O(1..10) and fp16 keeps ~3.3 significant
  digits (relative error <= 2**-11), far below the noise of training a projection on them,
  while halving disk and page-cache use. A part whose values overflow fp16 (|x| > 65504) is
  stored as float32 instead (its dtype is in ``keys.json``). ``get`` always returns float32.
- Filling: the data pipeline decodes (in its workers) while the tower runs in lanes, on a CPU
  one single-threaded pass per torch thread on ``LANE_ROWS`` images at a time
  (``clipkit.models.inference.in_lanes``) instead of one pass split over all threads; captions
  are not tokenized. A key's features do not depend on the lanes (``LANE_ROWS``), so caches
  filled before lanes stay valid under the same fingerprint. A CNN tower's fp32 pass runs as a
  frozen TorchScript graph traced on the first batch of each group of ``FLUSH_ROWS``
  (``clipkit.models.inference.graph_mode``: batch norms folded, ~1e-5 from the eager pass, far
  under float16's rounding), so the fingerprint stays too. A bf16 fill reports whether the
  CPU computes in bf16 or only emulates it (``clipkit.models.embed.bf16_support``).
- Writes are atomic and ordered: a part file first, then ``keys.json`` naming it. A build is
  saved every ``FLUSH_ROWS`` new rows, so a killed build keeps what it had saved. If the shard
  folder is read-only the cache goes to ``<run_dir>/feature_cache/<fingerprint>/`` (seeded from
  any cache there is beside the shards).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from clipkit.config import AugmentConfig, Config, DataConfig
from clipkit.data.atomic import atomic_open, atomic_write_text
from clipkit.data.augment import ViewStack, views_fingerprint
from clipkit.data.tario import iter_samples
from clipkit.data.urls import expand_urls, is_local
from clipkit.errors import ClipkitError
from clipkit.models.embed import bf16_support
from clipkit.models.inference import bulk_inference, cpu_lanes, graph_mode, in_lanes
from clipkit.training.stream import split_inputs

CACHE_DIRNAME = "_clipkit_cache"
FP16_MAX = float(np.finfo(np.float16).max)
BUILD_BATCH = 64  # tensors per forward with one lane (a GPU, or one torch thread)
# Tensors per forward in each CPU lane. Small batches keep a lane's activations in the CPU's
# caches (EfficientNet-Lite0 at 160 px, 2 lanes: 16 -> ~1.2x the images/s of 32); >= 16 keeps
# oneDNN on its batch kernels, whose per-image outputs do not depend on the batch size: a key's
# features equal those of a BUILD_BATCH pass bit for bit (tests/test_cache_fill.py).
LANE_ROWS = 16
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
        self.views = int(self.meta.get("views", 1))  # > 1: part rows are (n, views, *shape)
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

    def get(self, key: str, view: int = 0) -> np.ndarray:
        """float32 copy of view ``view`` of the value cached for ``key`` (KeyError when absent):
        (F,) for tower outputs, the stored shape for any other cached tensor."""
        if not 0 <= view < self.views:
            raise IndexError(
                f"feature cache {self.folder} holds {self.views} view(s) per key; asked for view {view}"
            )
        i = self._index[key]
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        row = self._parts()[part][i - self._starts[part]]  # (*shape) or, with views, (views, *shape)
        return np.array(row[view] if self.views > 1 else row, dtype=np.float32)

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
    if cfg.train.cache_views > 1:  # the augmented views go through the cache
        return None
    if not model.image_features_cacheable:
        return "the vision tower trains on a random (augmenting) transform (train.cache_views=K caches views)"
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


@dataclass(frozen=True)
class CacheJob:
    """What a cache holds: ``encode`` of each image's views, under ``fingerprint`` (folder name).

    ``encode(images (n, 3, H, W)) -> (n, *shape)`` runs under ``torch.inference_mode`` with the
    model in eval mode and its vision tower laid out by ``bulk_inference(precision)``; ``views``
    > 1 stores (views, *shape) per key (view 0 the eval transform; ``clipkit.data.augment``).
    """

    model: Any  # the DualEncoder: its image transforms and vision tower
    encode: Callable[[torch.Tensor], torch.Tensor]
    fingerprint: str
    views: int = 1
    precision: str = "fp32"

    def transform(self) -> Callable[..., torch.Tensor]:
        """The loader's image transform: the eval transform, or a ``ViewStack`` of the views."""
        eval_transform = self.model.image_transform(train=False)
        if self.views <= 1:
            return eval_transform
        vision = self.model.vision
        if vision.deterministic_transform:
            raise ClipkitError(
                f"{self.views} cached views of {vision.spec} would all be its eval view: its training "
                "transform does not augment; set model.vision.augment=true"
            )
        augmentation: AugmentConfig = vision.augmentation  # what image_transform(train=True) applies
        train_transform = self.model.image_transform(train=True)
        return ViewStack(eval_transform, train_transform, self.views, augmentation.view_seed)


def cache_fingerprint(tower: Any, precision: str = "fp32", views: int = 1, base: str | None = None) -> str:
    """Folder name of a cache of ``tower``'s images: ``base`` (default ``tower.fingerprint()``),
    ``-bf16`` when so computed, and with views ``-views<K>-<hash of the augmentation settings>``."""
    name = (tower.fingerprint() if base is None else base) + ("" if precision == "fp32" else f"-{precision}")
    return name + (f"-{views_fingerprint(tower.augmentation, views)}" if views > 1 else "")


def _no_text(texts: list[str]) -> torch.Tensor:
    """The fill's tokenizer: captions are not needed, so none are tokenized. (B, 0)."""
    return torch.zeros((len(texts), 0), dtype=torch.long)


def _image_batches(
    job: CacheJob, data_cfg: DataConfig, shards: list[Path], wanted: set[str], rows: int
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(keys, images) of the ``wanted`` keys in ``shards``, read in order by the data pipeline
    (decoded in its workers, or here while the lanes run): images (b, 3, H, W) or, with views,
    (b, views, 3, H, W). Every batch holds ``ceil(rows / views)`` images, but the last, which
    takes the remainder too (< 2x that): no short tail batch runs on other kernels."""
    from clipkit.data import build_loader

    per_batch = -(-rows // max(1, job.views))  # >= rows tensors per forward
    cfg = dataclasses.replace(data_cfg, batch_size=per_batch, shuffle_buffer=0)
    loader = build_loader(
        cfg, "::".join(str(s) for s in shards), job.transform(), _no_text,
        train=False, seed=0, rank=0, world_size=1,
    )  # fmt: skip
    picked: set[str] = set()
    keys: list[str] = []
    chunks: list[torch.Tensor] = []  # the picked images read and not yet handed out, in order
    for batch in loader:  # workers' batches come in turn, some short (a worker's last)
        inputs, meta = split_inputs(batch)  # the keys find the rows; only images reach the tower
        pick = [i for i, k in enumerate(meta.keys) if k in wanted and k not in picked]
        if not pick:
            continue
        picked.update(meta.keys[i] for i in pick)
        keys += [meta.keys[i] for i in pick]
        whole = len(pick) == len(meta.keys)
        chunks.append(inputs["image"] if whole else inputs["image"][pick])  # no copy when all are wanted
        while len(keys) >= 2 * per_batch:
            if len(chunks[0]) != per_batch:  # a short or long chunk first: regroup (one copy)
                joined = torch.cat(chunks)
                chunks = [joined[:per_batch], joined[per_batch:]]
            yield keys[:per_batch], chunks.pop(0)
            keys = keys[per_batch:]
    if keys:
        yield keys, torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def fill_plan(device: torch.device, lanes: int | None = None) -> tuple[int, int]:
    """(lanes, tensors per forward) of a fill on ``device``: on a CPU one lane per torch thread
    (``clipkit.models.inference.in_lanes``) at ``LANE_ROWS``; elsewhere one at ``BUILD_BATCH``."""
    cpu = device.type == "cpu"
    return (cpu_lanes(device) if lanes is None else max(1, lanes)), (LANE_ROWS if cpu else BUILD_BATCH)


def _compute(
    job: CacheJob,
    data_cfg: DataConfig,
    shards: list[Path],
    wanted: set[str],
    device: torch.device,
    bar: tqdm,
    lanes: int | None = None,
    rows: int | None = None,
) -> dict[str, np.ndarray]:
    """``job.encode`` of the ``wanted`` keys' views, float32, reading ``shards`` in order.

    Batches of about ``rows`` tensors run in ``lanes`` (defaults: ``fill_plan``) while the next
    ones are decoded; a key's row does not depend on the lanes (see ``LANE_ROWS``)."""
    model, views = job.model, max(1, job.views)
    lanes, planned = fill_plan(device, lanes)
    rows = rows or planned
    batches = _image_batches(job, data_cfg, shards, wanted, rows)
    found: dict[str, np.ndarray] = {}
    was_training = model.training
    model.eval()
    try:
        with bulk_inference(model.vision, job.precision) as prep:
            first = next(batches, None)
            if first is None:
                return found
            batches = itertools.chain([first], batches)

            def flat(images: torch.Tensor) -> torch.Tensor:  # (b[, views], 3, H, W) -> (b * views, 3, H, W)
                return prep(images.reshape(-1, *images.shape[-3:]).to(device, non_blocking=True))

            run = graph_mode(job.encode, model.vision, flat(first[1]), job.precision)

            def encode(item: tuple[list[str], torch.Tensor]) -> np.ndarray:
                return run(flat(item[1])).float().cpu().numpy()  # (b * views, *shape)

            for (keys, _), out in in_lanes(encode, batches, lanes, job.precision, device.type):
                rows_of = out.reshape(len(keys), views, *out.shape[1:]) if views > 1 else out
                found.update(zip(keys, rows_of))
                bar.update(len(keys))
    finally:
        model.train(was_training)
    return found


def precision_note(precision: str, device: torch.device | str) -> str:
    """How a bf16 fill ran, for its report: detected, never assumed (``bf16_support``)."""
    native = bf16_support(device)
    if native:
        return f"{precision} autocast ({native})"
    return f"{precision} autocast emulated: {torch.device(device).type} has no native bf16, slower than fp32"


def _chunks(
    todo: list[Path], per_shard: dict[Path, list[str]], missing: set[str], rows: int
) -> list[list[Path]]:
    """Consecutive groups of shards holding >= ``rows`` missing keys (the last group fewer)."""
    groups: list[list[Path]] = [[]]
    count = 0
    for shard in todo:
        if count >= rows:
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
        rows = np.stack(list(new.values()))  # (n, F), or (n, [views,] *shape)
        dtype = np.float16 if np.all(np.abs(rows) <= FP16_MAX) else np.float32
        name = f"features-{len(parts):06d}.npy"
        with atomic_open(folder / name, "wb") as f:
            np.save(f, rows.astype(dtype))
        parts.append({"file": name, "rows": len(rows), "dtype": np.dtype(dtype).name})
        keys += list(new)
    value_axes = 2 if meta.get("views", 1) > 1 else 1  # axes of one view: the value's shape
    dim = int(np.prod(rows.shape[value_axes:])) if new else old.meta.get("dim", 0)
    index = {**meta, "dim": dim, "parts": parts}
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
    views: int = 1,
) -> tuple[FeatureCache, str]:
    """Cache ``model.tower_features`` for every sample of ``urls``; returns (cache, one-line report).

    Only keys missing from an existing cache of the same tower fingerprint are computed, and
    only the shards holding them are read. ``precision="bf16"`` computes under bf16 autocast
    (``clipkit.models.inference``) into a cache of its own (fingerprint suffix ``-bf16``).
    ``views`` > 1 caches that many views of each image (``train.cache_views``; module docstring).
    """
    fingerprint = cache_fingerprint(model.vision, precision, views)
    job = CacheJob(model, model.tower_features, fingerprint, views, precision)
    return build_cache(job, data_cfg, urls, run_dir, device, progress)


def build_cache(
    job: CacheJob,
    data_cfg: DataConfig,
    urls: str,
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    progress: bool = True,
    lanes: int | None = None,
) -> tuple[FeatureCache, str]:
    """Cache ``job`` for every sample of ``urls`` (``build_feature_cache``'s work for any job);
    ``lanes``: batches run at once (default ``fill_plan``: one per torch thread on a CPU)."""
    shards = shard_paths(urls)
    read_from, write_to, note = cache_folders(shards, job.fingerprint, Path(run_dir))
    old = FeatureCache(write_to if (write_to / "keys.json").is_file() else read_from)
    per_shard = scan_keys(shards)
    known = set(old.keys) | old.absent
    missing = {k for keys in per_shard.values() for k in keys if k not in known}
    if not missing:
        where = f"{old.folder}" + (f" ({note})" if note and old.folder == write_to else "")
        return old, f"{len(old)} samples cached in {where}, nothing to compute"
    todo = [s for s, keys in per_shard.items() if any(k in missing for k in keys)]
    meta = {"fingerprint": job.fingerprint, "tower": getattr(job.model.vision, "spec", ""), "version": 1}
    if job.views > 1:
        augmentation = dataclasses.asdict(job.model.vision.augmentation)
        meta.update(views=job.views, augmentation=augmentation)
    write_to.mkdir(parents=True, exist_ok=True)
    lanes = fill_plan(torch.device(device), lanes)[0]
    reused, computed, t0 = len(old), 0, time.perf_counter()
    bar = tqdm(total=len(missing), desc="feature cache", unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        rows = max(1, FLUSH_ROWS // max(1, job.views))  # images per save (each holds its views)
        for group in _chunks(todo, per_shard, missing, rows):  # saved after each: a kill loses one group
            new = _compute(job, data_cfg, group, missing, torch.device(device), bar, lanes)
            group_keys = {k for shard in group for k in per_shard[shard] if k in missing}
            old = _append(write_to, old, new, old.absent | (group_keys - set(new)), meta)
            computed += len(new)
    took = time.perf_counter() - t0
    report = (
        f"{len(old)} samples cached in {write_to}: {computed} computed now "
        f"({computed / max(took, 1e-9):.0f} img/s"
        + (f", {job.views} views each" if job.views > 1 else "")
        + (f", {lanes} lanes" if lanes > 1 else "")
        + (f", {precision_note(job.precision, device)}" if job.precision != "fp32" else "")
        + f"), {reused} reused"
        + (f", {len(old.absent)} unreadable" if old.absent else "")
        + (f"; {note}" if note else "")
    )
    return old, report
