"""Shards -> batches: ``build_loader(cfg.data, urls, transform, tokenize, train=..., seed=...)``.

Each batch is the dict of ARCHITECTURE.md ("Batch"):

    "image"  (B, 3, H, W) float   or  "image_features" (B, F) float (feature-cache path)
    "text"   (B, L) long          token ids
    "key"    list[str]            webdataset __key__
    "idx"    (B,) long            the shard's idx member, -1 when absent
    "skipped" dict[str, int]      samples this worker skipped since its previous batch

Data flow inside each DataLoader worker (all per-sample work happens there):

    this (rank, worker)'s shards -> tar members -> [shuffle buffer] -> decode + transform
        -> batch of B -> tokenize -> dict

A transform of the usual torchvision shape (RandomResizedCrop or Resize + CenterCrop, then
ToTensor + Normalize) runs as an equivalent, faster plan: crop drawn before decoding, JPEG DCT
downscale to what the crop needs, normalisation per batch (``fast_transform.py``; opt out with
``transform.fast_path = False``). Other transforms run as given, per sample.

Shard assignment: the shard list (shuffled in train mode, identically on every rank, seeded
by seed and epoch) is dealt round-robin to ranks, then each rank's list to its workers, so
every shard is read by exactly one (rank, worker) per epoch. Train mode yields only full
batches (equal shapes for cross-rank gathers); eval mode keeps the last partial batch. With
several workers, batches come round-robin from the workers (deterministic, not file order).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.config import DataConfig
from clipkit.data.decode import SampleError, decode_caption, decode_image, parse_idx
from clipkit.data.fast_transform import FastImage, draft_size_of, empty_batch, plan_fast_image
from clipkit.data.tario import DuplicateMember, TarDamaged, iter_samples
from clipkit.data.urls import ShardSpecError, dataset_size, expand_urls, is_local, open_url, shard_sizes
from clipkit.errors import ClipkitError

__all__ = ["DataError", "FeatureLookup", "ShardSpecError", "build_loader", "dataset_size", "expand_urls"]


class DataError(ClipkitError, ValueError):
    """Bad data with ``on_error="raise"``, or shards that cannot serve the requested setup."""


class FeatureLookup(Protocol):
    def __contains__(self, key: str) -> bool: ...
    def get(self, key: str) -> np.ndarray: ...


def _rng(*parts: Any) -> random.Random:
    # A str seed is hashed with sha512: stable across processes and PYTHONHASHSEED.
    return random.Random(":".join(str(p) for p in parts))


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle: hold ``size`` items, emit a random one as each new one arrives."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    prev = torch.get_num_threads()
    if prev != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if prev != n:
            torch.set_num_threads(prev)


class ShardDataset(IterableDataset):
    """One rank's shards as a stream of batch dicts (see module docstring)."""

    def __init__(
        self,
        shards: list[str],
        cfg: DataConfig,
        image_transform: Callable[[Image.Image], torch.Tensor] | None,
        tokenize: Callable[[list[str]], torch.Tensor],
        *,
        train: bool,
        seed: int,
        epoch: int,
        rank: int,
        feature_lookup: FeatureLookup | None,
    ):
        self.shards, self.cfg, self.train = shards, cfg, train
        self.image_transform, self.tokenize = image_transform, tokenize
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.feature_lookup = feature_lookup
        self.sizes = shard_sizes(shards)
        self.image_exts = [e.strip().lower() for e in cfg.image_keys.split(";") if e.strip()]
        self.draft_size = draft_size_of(image_transform)
        # The usual torchvision shapes run as an equivalent, faster plan (fast_transform.py).
        self.fast: FastImage | None = None
        if image_transform is not None and feature_lookup is None:
            self.fast = plan_fast_image(image_transform)
        wanted = {cfg.caption_key, "idx"} | (set() if feature_lookup is not None else set(self.image_exts))
        self._want = wanted.__contains__

    # ------------------------------------------------------------------ errors

    def _bad(self, counts: Counter[str], url: str, key: str, err: SampleError) -> None:
        if self.cfg.on_error == "raise":
            raise DataError(
                f"bad sample '{key}' in shard '{url}': {err} "
                "(set data.on_error=skip to skip, count and report such samples)"
            ) from err
        counts[err.kind] += 1

    def _bad_shard(self, counts: Counter[str], url: str, n_read: int, err: Exception) -> None:
        kind = "unreadable_shard" if isinstance(err, OSError) else "corrupt_shard"
        expected = self.sizes.get(url)
        if self.cfg.on_error == "raise":
            raise DataError(
                f"shard '{url}' is damaged after {n_read} samples"
                f"{f' of {expected}' if expected else ''}: {err} "
                "(rebuild the shard, or set data.on_error=skip to use what is readable)"
            ) from err
        # With sizes.json we know how many samples were lost; otherwise count the event once.
        counts[kind] += max(1, expected - n_read) if expected else 1

    # ------------------------------------------------------------------ stages

    def _read_shard(self, url: str, counts: Counter[str]) -> Iterator[dict[str, Any]]:
        n = 0
        try:
            with contextlib.closing(open_url(url)) as stream:
                for sample in iter_samples(stream, self._want):
                    n += 1
                    if isinstance(sample, DuplicateMember):
                        self._bad(counts, url, "?", SampleError("duplicate_member", str(sample)))
                        continue
                    sample["__url__"] = url  # type: ignore[assignment]
                    yield sample
                if not is_local(url):
                    # Drain the tar's trailing padding so a pipe's writer exits cleanly
                    # instead of dying of SIGPIPE (which gopen would report as an error).
                    while stream.read(1 << 16):
                        pass
        except (TarDamaged, OSError, EOFError, zlib.error) as e:
            self._bad_shard(counts, url, n, e)

    def _prepare(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raw members -> {"key", "idx", "caption", "image" | "image_features"}; may raise SampleError."""
        key = raw["__key__"]
        out = {"key": key, "caption": decode_caption(raw.get(self.cfg.caption_key))}
        out["idx"] = parse_idx(raw.get("idx"))
        if self.feature_lookup is not None:
            if key not in self.feature_lookup:
                raise SampleError("missing_feature", f"no cached feature for key '{key}'")
            out["image_features"] = np.asarray(self.feature_lookup.get(key), dtype=np.float32)
            return out
        data = next((raw[e] for e in self.image_exts if e in raw), None)
        if self.fast is not None:
            out["image"] = self.fast.load(data)  # (H, W, 3) uint8; to float per batch in _collate
            return out
        img = decode_image(data, draft_size=self.draft_size)
        out["image"] = self.image_transform(img)  # (3, H, W); transform bugs are not data errors
        return out

    def _prepared(self, raws: Iterable[dict[str, Any]], counts: Counter[str]) -> Iterator[dict[str, Any]]:
        for raw in raws:
            try:
                yield self._prepare(raw)
            except SampleError as err:
                self._bad(counts, raw["__url__"], raw["__key__"], err)

    def _collate(self, samples: list[dict[str, Any]], counts: Counter[str]) -> dict[str, Any]:
        text = torch.as_tensor(self.tokenize([s["caption"] for s in samples])).long()  # (B, L)
        if text.ndim != 2 or text.shape[0] != len(samples):
            raise ValueError(f"tokenize must return (B, L) token ids, got shape {tuple(text.shape)}")
        batch: dict[str, Any] = {}
        if self.feature_lookup is not None:
            batch["image_features"] = torch.from_numpy(np.stack([s["image_features"] for s in samples]))
        elif self.fast is not None:
            batch["image"] = self.fast.collate([s["image"] for s in samples])  # (B, 3, H, W)
        else:
            images = [s["image"] for s in samples]
            out = empty_batch((len(images), *images[0].shape), images[0].dtype)
            batch["image"] = torch.stack(images, out=out)  # (B, 3, H, W)
        batch["text"] = text
        batch["key"] = [s["key"] for s in samples]
        batch["idx"] = torch.tensor([s["idx"] for s in samples], dtype=torch.long)  # (B,)
        batch["skipped"] = dict(counts)
        counts.clear()
        return batch

    def _batches(self, shards: list[str], worker: int) -> Iterator[dict[str, Any]]:
        counts: Counter[str] = Counter()  # skips since this worker's previous batch
        raws: Iterable[dict[str, Any]] = (s for url in shards for s in self._read_shard(url, counts))
        if self.train and self.cfg.shuffle_buffer > 1:
            rng = _rng(self.seed, self.epoch, self.rank, worker, "samples")
            raws = shuffle_buffer(raws, self.cfg.shuffle_buffer, rng)
        # Each batch waits for the next one (or the end) before it goes out, so skips found
        # after the last batch was built (a damaged last shard) still ride on a batch.
        pending: dict[str, Any] | None = None
        samples: list[dict[str, Any]] = []
        for sample in self._prepared(raws, counts):
            samples.append(sample)
            if len(samples) == self.cfg.batch_size:
                if pending is not None:
                    yield pending
                pending, samples = self._collate(samples, counts), []
        if samples and not self.train:
            if pending is not None:
                yield pending
            pending = self._collate(samples, counts)
        if pending is None:
            if counts:
                warnings.warn(f"loader worker {worker}: no usable batch in {shards}; skipped {dict(counts)}")
            return
        pending["skipped"] = dict(Counter(pending["skipped"]) + counts)
        yield pending

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        batches = self._batches(self.shards[worker::n_workers], worker)
        if info is not None:
            yield from batches  # the worker's thread count was set by worker_init_fn
            return
        # No workers: limit torch threads only while producing a batch, not for the model.
        while True:
            with _torch_threads(self.cfg.threads_per_worker):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


# ---------------------------------------------------------------------------- loader


def _init_worker(threads: int, _worker_id: int) -> None:
    torch.set_num_threads(threads)


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _check_setup(cfg: DataConfig, rank: int, world: int) -> None:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world_size {world}")
    if cfg.on_error not in ("skip", "raise"):
        raise ValueError(f"data.on_error must be 'skip' or 'raise', got {cfg.on_error!r}")
    for name in ("batch_size", "threads_per_worker"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"data.{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("workers", "shuffle_buffer"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"data.{name} must be >= 0, got {getattr(cfg, name)}")


def _rank_shards(
    urls: list[str], cfg: DataConfig, train: bool, seed: int, epoch: int, rank: int, world: int
) -> list[str]:
    """This rank's shards: in train mode from a shuffle that is identical on every rank."""
    readers = max(1, cfg.workers) * world
    if train and len(urls) < readers:
        fix = (
            f"or set data.workers={len(urls) // world}"
            if len(urls) >= world
            else "there are fewer shards than ranks, so only resharding helps"
        )
        raise DataError(
            f"{len(urls)} shard(s) for {world} rank(s) x {max(1, cfg.workers)} loader worker(s) = "
            f"{readers} readers; in training every reader needs its own shard(s). Write at least "
            f"{readers} shards (a smaller ShardWriter maxcount), {fix}"
        )
    if train:
        urls = list(urls)
        _rng(seed, epoch, "shards").shuffle(urls)
    return urls[rank::world]


def build_loader(
    cfg: DataConfig,
    urls: str,
    image_transform: Callable[[Image.Image], torch.Tensor] | None,
    tokenize: Callable[[list[str]], torch.Tensor],
    *,
    train: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    feature_lookup: FeatureLookup | None = None,
    epoch: int = 0,
) -> DataLoader:
    """One epoch over the shards of ``urls`` as batch dicts (see module docstring).

    ``feature_lookup`` (``key in lookup``, ``lookup.get(key) -> (F,) array``) replaces image
    decoding by cached locked-tower features: batches then carry ``"image_features"``.
    The returned DataLoader also has ``.shards`` (this rank's) and ``.num_samples`` (this
    rank's sample count from ``sizes.json``, or None).
    """
    if feature_lookup is None and image_transform is None:
        raise ValueError("build_loader needs an image_transform unless a feature_lookup is given")
    _check_setup(cfg, rank, world_size)
    all_urls = expand_urls(urls)
    shards = _rank_shards(all_urls, cfg, train, seed, epoch, rank, world_size)
    dataset = ShardDataset(
        shards, cfg, image_transform, tokenize, train=train, seed=seed, epoch=epoch, rank=rank,
        feature_lookup=feature_lookup,
    )  # fmt: skip
    workers = min(cfg.workers, len(shards))  # eval: a worker without shards would idle
    if workers > 0:
        # Forked workers tokenize; a tokenizer thread pool inherited across fork can deadlock.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        dataset,
        batch_size=None,  # batches are built inside the workers
        num_workers=workers,
        collate_fn=_identity,
        worker_init_fn=functools.partial(_init_worker, cfg.threads_per_worker) if workers else None,
        generator=torch.Generator().manual_seed(_rng(seed, epoch, rank, "torch").getrandbits(62)),
        pin_memory=torch.cuda.is_available(),
    )
    loader.shards = shards  # type: ignore[attr-defined]
    loader.num_samples = dataset_size(shards) if shards else 0  # type: ignore[attr-defined]
    return loader
