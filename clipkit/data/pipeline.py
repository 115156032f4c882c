"""Shards -> batches: ``build_loader(cfg.data, urls, transform, tokenize, train=..., seed=...)``.

Each batch is the dict of ARCHITECTURE.md ("Batch"):

    "image"  (B, 3, H, W) float   or  "image_features" (B, F) float (feature-cache path)
    "text"   (B, L) long          token ids
    "key"    list[str]            webdataset __key__
    "idx"    (B,) long            the shard's idx member, -1 when absent
    "skipped" dict[str, int]      samples this worker skipped since its previous batch

A worker that ends without any usable sample but skipped some yields one batch without
samples (``"key": []``, ``"idx"`` empty, no ``"image"`` / ``"text"``) that carries its
``"skipped"`` counts: every dropped sample is reported.

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

Exact resume (train mode): a worker's pass is a function of (seed, epoch, rank, worker): its
shards, their order and its shuffle buffer's RNG. Each batch carries the worker's position
after it (``"stream"``: shard index and samples consumed of it, the shuffle buffer's samples
as (shard, number) and its RNG state). ``build_loader(resume=...)`` continues every worker from
such a position: shards before it are not opened, samples before it in its shard are skipped
by seeking over their tar members, the buffer is refilled from the few shards it came from,
and DataLoader worker 0 plays the worker whose batch was next. Random augmentations are
seeded per sample (from seed, epoch, shard and sample number), so a sample's crop does not
depend on what the worker decoded before it.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import random
import signal
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.config import DataConfig
from clipkit.data.decode import SampleError, decode_caption, decode_image, parse_idx
from clipkit.data.fast_transform import FastImage, draft_size_of, empty_batch, plan_fast_image
from clipkit.data.tario import DuplicateMember, TarDamaged, iter_numbered_samples
from clipkit.data.text_augment import augment_captions
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


class ShuffleBuffer:
    """Reservoir-style shuffle: hold ``size`` items, emit a random one as each new one arrives.

    An object rather than a generator so that its state (``held``, ``draining``, ``rng``) can
    be saved and put back mid-stream: the output order is a function of the rng and the
    input alone. While ``draining`` (the input ended), ``held`` is the rest in reverse.
    """

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng = size, rng
        self.held: list[Any] = []
        self.draining = False

    def __call__(self, items: Iterable[Any]) -> Iterator[Any]:
        if not self.draining:
            for item in items:
                if len(self.held) < self.size:
                    self.held.append(item)
                    continue
                i = self.rng.randrange(self.size)
                self.held[i], item = item, self.held[i]
                yield item
            self.rng.shuffle(self.held)
            self.held.reverse()  # popped from the end: the shuffled order
            self.draining = True
        while self.held:
            yield self.held.pop()


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle of ``items`` (see ``ShuffleBuffer``)."""
    return ShuffleBuffer(size, rng)(items)


@dataclass
class _Cursor:
    """Where one worker's pass stands: the shard being read (index in the worker's list), the
    samples of it consumed (numbers of ``tario.iter_numbered_samples``), what went out."""

    worker: int
    shard: int = 0
    offset: int = 0
    batches: int = 0
    samples: int = 0


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]  # plain lists: loadable with weights_only


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
        resume: dict[str, Any] | None = None,
        progress: Any = None,
    ):
        self.shards, self.cfg, self.train = shards, cfg, train
        self.image_transform, self.tokenize = image_transform, tokenize
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.feature_lookup = feature_lookup
        # Exact resume: worker w continues from positions[w]; DataLoader worker 0 plays
        # worker first_worker, so that the round-robin goes on with the worker that was next.
        self.first_worker = resume["next_worker"] if resume else 0
        self.positions: list[dict[str, Any] | None] = resume["positions"] if resume else []
        self.progress = progress  # shared (shard, sample) per worker, for the stall watchdog
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

    def _read_shard(self, url: str, counts: Counter[str], cursor: _Cursor) -> Iterator[dict[str, Any]]:
        """Samples of shard ``cursor.shard`` from number ``cursor.offset`` on (earlier ones unread)."""
        n = skip = cursor.offset
        try:
            with contextlib.closing(open_url(url)) as stream:
                for number, sample in iter_numbered_samples(
                    stream, self._want, skip.__le__ if skip else None
                ):
                    n = cursor.offset = number + 1
                    if self.progress is not None:
                        self.progress[2 * cursor.worker + 1] = n
                    if isinstance(sample, DuplicateMember):
                        self._bad(counts, url, "?", SampleError("duplicate_member", str(sample)))
                        continue
                    sample["__url__"] = url  # type: ignore[assignment]
                    sample["__pos__"] = (cursor.shard, number)  # type: ignore[assignment]
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
        # Random augmentations draw from torch's RNG; in training it is seeded per sample (and
        # put back after), so a sample's crop depends on the sample alone, not on what the
        # worker decoded before it: a resumed stream that skips samples undecoded stays exact.
        seeded = self.train and self.image_transform is not None and self.feature_lookup is None
        gen = torch.default_generator  # (torch.manual_seed would also seed every GPU: 25x slower)
        for raw in raws:
            try:
                if seeded:
                    saved = gen.get_state()
                    shard = zlib.crc32(raw["__url__"].encode())  # str hash() differs per process
                    gen.manual_seed(hash((self.seed, self.epoch, shard, raw["__pos__"][1])) & (2**63 - 1))
                    try:
                        out = self._prepare(raw)
                    finally:
                        gen.set_state(saved)
                else:
                    out = self._prepare(raw)
            except SampleError as err:
                self._bad(counts, raw["__url__"], raw["__key__"], err)
                continue
            yield out  # after the RNG is put back: the consumer's own draws are not undone

    def _collate(self, samples: list[dict[str, Any]], counts: Counter[str]) -> dict[str, Any]:
        captions = [s["caption"] for s in samples]
        if self.train:  # word dropout / shuffle, when configured (clipkit.data.text_augment)
            captions = augment_captions(samples, self.cfg, self.seed, self.epoch)
        text = torch.as_tensor(self.tokenize(captions)).long()  # (B, L)
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

    def _raws(self, shards: list[str], cursor: _Cursor, counts: Counter[str]) -> Iterator[dict[str, Any]]:
        first, skip = cursor.shard, cursor.offset
        for i in range(first, len(shards)):
            cursor.shard, cursor.offset = i, skip if i == first else 0
            if self.progress is not None:
                self.progress[2 * cursor.worker] = i
            yield from self._read_shard(shards[i], counts, cursor)
        cursor.shard, cursor.offset = len(shards), 0

    def _snapshot(self, cursor: _Cursor, buffer: ShuffleBuffer | None) -> dict[str, Any]:
        """This worker's position after the batch just built: enough to continue right after it."""
        return {
            "worker": cursor.worker,
            "shard": cursor.shard,
            "offset": cursor.offset,
            "batches": cursor.batches,
            "samples": cursor.samples,
            # The shuffle buffer's samples by (shard, number), and its RNG.
            "held": [list(s["__pos__"]) for s in buffer.held] if buffer else [],
            "draining": buffer.draining if buffer else False,
            "rng": _rng_state(buffer.rng) if buffer else None,
        }

    def _restore(
        self, shards: list[str], pos: dict[str, Any], cursor: _Cursor, buffer: ShuffleBuffer | None
    ) -> None:
        """Put a ``_snapshot`` back: shards before the cursor are not opened, samples not decoded."""
        cursor.shard, cursor.offset = int(pos["shard"]), int(pos["offset"])
        cursor.batches, cursor.samples = int(pos["batches"]), int(pos["samples"])
        if buffer is None:
            return
        version, internal, gauss = pos["rng"]
        buffer.rng.setstate((version, tuple(internal), gauss))
        buffer.draining = bool(pos["draining"])
        held = [tuple(p) for p in pos["held"]]
        found: dict[tuple[int, int], dict[str, Any]] = {}
        for shard in sorted({s for s, _ in held}):
            wanted = {n for s, n in held if s == shard}
            url = shards[shard]
            try:
                with contextlib.closing(open_url(url)) as stream:
                    for number, sample in iter_numbered_samples(stream, self._want, wanted.__contains__):
                        if isinstance(sample, dict):
                            sample["__url__"], sample["__pos__"] = url, (shard, number)  # type: ignore[assignment]
                            found[(shard, number)] = sample
            except (TarDamaged, OSError, EOFError, zlib.error):
                pass  # what could be read is in found; a missing sample is reported below
        missing = [p for p in held if p not in found]
        if missing:
            s, n = missing[0]
            raise DataError(
                f"cannot continue the data stream where the checkpoint left it: sample {n} of shard "
                f"'{shards[s]}' is gone ({len(missing)} samples missing); the shards changed since "
                "the checkpoint was written"
            )
        buffer.held = [found[p] for p in held]

    def _batches(
        self, shards: list[str], worker: int, pos: dict[str, Any] | None
    ) -> Iterator[dict[str, Any]]:
        counts: Counter[str] = Counter()  # skips since this worker's previous batch
        cursor = _Cursor(worker)
        buffer = None
        if self.train and self.cfg.shuffle_buffer > 1:
            buffer = ShuffleBuffer(
                self.cfg.shuffle_buffer, _rng(self.seed, self.epoch, self.rank, worker, "samples")
            )
        if pos is not None:
            self._restore(shards, pos, cursor, buffer)
        raws: Iterable[dict[str, Any]] = self._raws(shards, cursor, counts)
        if buffer is not None:
            raws = buffer(raws)
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
                cursor.batches, cursor.samples = cursor.batches + 1, cursor.samples + len(pending["key"])
                if self.train:
                    pending["stream"] = self._snapshot(cursor, buffer)
        if samples and not self.train:
            if pending is not None:
                yield pending
            pending = self._collate(samples, counts)
        if pending is None:
            if counts:  # no batch to carry the skips: an empty one does, so that every one is counted
                if pos is None:
                    warnings.warn(
                        f"loader worker {worker}: no usable batch in {shards}; skipped {dict(counts)}"
                    )
                empty = {"key": [], "idx": torch.empty(0, dtype=torch.long), "skipped": dict(counts)}
                if self.train:
                    empty["stream"] = self._snapshot(cursor, buffer)
                yield empty
            return
        pending["skipped"] = dict(Counter(pending["skipped"]) + counts)
        yield pending

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot, n_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (slot + self.first_worker) % n_workers
        pos = self.positions[worker] if worker < len(self.positions) else None
        batches = self._batches(self.shards[worker::n_workers], worker, pos)
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
    # Ctrl-C reaches the whole process group; the main process handles it (a training run
    # checkpoints first) and then stops the workers, so they must not die of it on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    resume: dict[str, Any] | None = None,
) -> DataLoader:
    """One epoch over the shards of ``urls`` as batch dicts (see module docstring).

    ``feature_lookup`` (``key in lookup``, ``lookup.get(key) -> (F,) array``) replaces image
    decoding by cached locked-tower features: batches then carry ``"image_features"``.
    The returned DataLoader also has ``.shards`` (this rank's) and ``.num_samples`` (this
    rank's sample count from ``sizes.json``, or None), ``.readers`` (its workers, at least 1)
    and ``.progress`` (shared ints: shard index in worker w's list at ``2w``, samples read of
    it at ``2w + 1``).

    In train mode every batch also carries ``"stream"``: the producing worker's position
    after it. ``resume = {"shards", "readers", "next_worker", "positions"}`` (one position per
    worker, None for a worker that had not produced a batch) continues a pass exactly there;
    with other shards or another number of workers it warns and the pass starts over.
    """
    if feature_lookup is None and image_transform is None:
        raise ValueError("build_loader needs an image_transform unless a feature_lookup is given")
    _check_setup(cfg, rank, world_size)
    all_urls = expand_urls(urls)
    shards = _rank_shards(all_urls, cfg, train, seed, epoch, rank, world_size)
    workers = min(cfg.workers, len(shards))  # eval: a worker without shards would idle
    readers = max(1, workers)
    if resume is not None and (list(resume["shards"]) != shards or int(resume["readers"]) != readers):
        warnings.warn(
            f"cannot continue epoch {epoch} of the data stream exactly: the checkpoint read "
            f"{len(resume['shards'])} shard(s) with {resume['readers']} reader(s) on this rank, now "
            f"{len(shards)} with {readers} (data.train or data.workers changed); the pass starts over",
            stacklevel=2,
        )
        resume = None
    progress = multiprocessing.RawArray("q", 2 * readers)  # written by the workers, read by the watchdog
    dataset = ShardDataset(
        shards, cfg, image_transform, tokenize, train=train, seed=seed, epoch=epoch, rank=rank,
        feature_lookup=feature_lookup, resume=resume, progress=progress,
    )  # fmt: skip
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
    loader.readers = readers  # type: ignore[attr-defined]
    loader.progress = progress  # type: ignore[attr-defined]
    loader.resumed = resume is not None  # type: ignore[attr-defined]
    loader.num_samples = dataset_size(shards) if shards else 0  # type: ignore[attr-defined]
    return loader
