"""Shards -> batches: ``build_loader(cfg.data, urls, transform, tokenize, train=..., seed=...)``.

Each batch is the dict of ARCHITECTURE.md ("Batch"): the model inputs (``"image"`` or
``"image_features"``, ``"text"``, ``"idx"``; ``clipkit.data.collate``) and the loader's
bookkeeping: ``"key"`` (list[str]), ``"skipped"`` (samples this worker skipped since its
previous batch, by kind; ``clipkit.data.skips``) and, in train mode, ``"stream"`` (the
worker's position after the batch; ``clipkit.data.resume``). A worker that ends without any
usable sample but skipped some yields one batch without samples (``"key": []``) that carries
its ``"skipped"`` counts: every dropped sample is reported.

Data flow inside each DataLoader worker (all per-sample work happens there):

    this (rank, worker)'s shards -> tar members -> [shuffle buffer] -> decode + transform
        -> batch of B -> tokenize -> dict

``ShardDataset`` composes the units: shard assignment (``clipkit.data.assign``: every shard
read by exactly one (rank, worker) per epoch), reading (``clipkit.data.reader``), the seeded
shuffle buffer (``clipkit.data.shuffle``), decoding and transforms (``clipkit.data.prepare``),
skip counting (``clipkit.data.skips``), collation (``clipkit.data.collate``) and the worker
position for exact resume (``clipkit.data.resume``). Train mode yields only full batches (equal shapes for
cross-rank gathers); eval mode keeps the last partial batch. With several workers, batches
come round-robin from the workers (deterministic, not file order).

A transform of the usual torchvision shape (RandomResizedCrop or Resize + CenterCrop, then
ToTensor + Normalize) runs as an equivalent, faster plan: crop drawn before decoding, JPEG DCT
downscale to what the crop needs, normalisation per batch (``fast_transform.py``; opt out with
``transform.fast_path = False``). Other transforms run as given, per sample.

Resampled (train mode with ``data.resampled``; ``clipkit.data.resample``): instead of being
dealt out, shards are drawn with replacement by every (rank, worker), endlessly, from one or
several weighted sources; batches then also carry ``"source"`` (list[int], each sample's
source) and the workers' positions hold the RNG states.

Exact resume (train mode): ``build_loader(resume=...)`` continues every worker from its
position: shards before it are not opened, samples before it in its shard are skipped by
seeking over their tar members, the buffer is refilled from the few shards it came from, and
DataLoader worker 0 plays the worker whose batch was next. Random augmentations are seeded per
sample (from seed, epoch, shard and sample number), so a sample's crop does not depend on what
the worker decoded before it.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.config import DataConfig
from clipkit.data import resume as resume_state
from clipkit.data.assign import rank_shards, worker_of, worker_shards
from clipkit.data.caption_templates import resolve_templates
from clipkit.data.collate import collate, skip_carrier
from clipkit.data.fast_transform import draft_size_of
from clipkit.data.prepare import FeatureLookup, SamplePreparer
from clipkit.data.reader import ShardReader
from clipkit.data.resample import resampled_mix, source_lists
from clipkit.data.resume import Cursor
from clipkit.data.shuffle import ShuffleBuffer, seeded_rng
from clipkit.data.skips import DataError, SkipCounter
from clipkit.data.text_augment import augment_captions
from clipkit.data.urls import ShardSpecError, dataset_size, expand_urls, open_url, shard_sizes

__all__ = [
    "DataError",
    "FeatureLookup",
    "ShardDataset",
    "ShardSpecError",
    "build_loader",
    "dataset_size",
    "draft_size_of",
    "expand_urls",
]


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


def _open(url: str) -> Any:
    return open_url(url)  # looked up when called: a test may replace this module's open_url


class ShardDataset(IterableDataset):
    """One rank's shards as a stream of batch dicts (see module docstring).

    ``want``, ``prepare``, ``skip_counter`` and ``collate`` are also the pieces a loader that
    reads samples another way (``clipkit.data.hard_negatives``) builds its batches with.
    """

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
        sources: list[list[str]] | None = None,
    ):
        self.shards, self.cfg, self.train = shards, cfg, train
        # data.resampled: every worker draws from all shards of these sources (clipkit.data.resample)
        self.sources = sources
        self.image_transform, self.tokenize = image_transform, tokenize
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.feature_lookup = feature_lookup
        # Exact resume: worker w continues from its position in `resume`; DataLoader worker 0
        # plays worker first_worker, so that the round-robin goes on with the worker that was next.
        self.resume = resume
        self.first_worker = resume["next_worker"] if resume else 0
        self.progress = progress  # shared (shard, sample) per worker, for the stall watchdog
        self.sizes = shard_sizes(shards)
        # Training draws one of a lookup's views per sample, from (seed, epoch, key) (augment.py).
        self.samples = SamplePreparer(cfg, image_transform, feature_lookup, (seed, epoch) if train else None)
        self.want, self.prepare = self.samples.want, self.samples.prepare

    def skip_counter(self) -> SkipCounter:
        return SkipCounter(self.cfg.on_error, self.sizes)

    def collate(self, samples: list[dict[str, Any]], skips: SkipCounter) -> dict[str, Any]:
        """The batch of ``samples``, carrying the skips counted since the previous one."""
        captions = None
        if self.train:  # word dropout / shuffle, caption templates, when configured (text_augment)
            captions = augment_captions(samples, self.cfg, self.seed, self.epoch)
        batch = collate(samples, self.tokenize, captions=captions, fast=self.samples.fast)
        batch["skipped"] = skips.take()
        return batch

    def _start(
        self, shards: list[str], worker: int, pos: dict[str, Any] | None, skips: SkipCounter
    ) -> tuple[Cursor, Callable[[], dict[str, Any]], Iterable[dict[str, Any]]]:
        """A worker's cursor, its position after the batch just built (a callable) and its raw
        samples, continued from ``pos`` when given."""
        cursor, buffer = Cursor(worker), None

        def reader_of(shards: list[str], cursor: Cursor) -> ShardReader:
            return ShardReader(shards, self.want, skips, cursor, opener=_open, progress=self.progress)

        if self.sources is not None:  # endless draws with replacement
            mix = resampled_mix(
                self.sources, self.cfg.train_weights, reader_of, cursor, seed=self.seed, rank=self.rank,
                shuffle_buffer=self.cfg.shuffle_buffer, batch_size=self.cfg.batch_size,
            )  # fmt: skip
            if pos is not None:
                mix.restore(pos)
            return cursor, mix.position, mix
        if self.train and self.cfg.shuffle_buffer > 1:
            rng = seeded_rng(self.seed, self.epoch, self.rank, worker, "samples")
            buffer = ShuffleBuffer(self.cfg.shuffle_buffer, rng)
        reader = reader_of(shards, cursor)
        if pos is not None:
            resume_state.restore(pos, cursor, buffer, shards, reader.fetch)
        where = functools.partial(resume_state.position, cursor, buffer)
        return cursor, where, reader if buffer is None else buffer(reader)

    def _batches(
        self, shards: list[str], worker: int, pos: dict[str, Any] | None
    ) -> Iterator[dict[str, Any]]:
        skips = self.skip_counter()  # skips since this worker's previous batch
        cursor, where, raws = self._start(shards, worker, pos, skips)
        # Each batch waits for the next one (or the end) before it goes out, so skips found
        # after the last batch was built (a damaged last shard) still ride on a batch.
        pending: dict[str, Any] | None = None
        samples: list[dict[str, Any]] = []
        seed = (self.seed, self.epoch) if self.train else None  # random crops seeded per sample
        for sample in self.samples.prepared(raws, skips, seed):
            samples.append(sample)
            if len(samples) == self.cfg.batch_size:
                if pending is not None:
                    yield pending
                pending, samples = self.collate(samples, skips), []
                cursor.count_batch(len(pending["key"]))
                if self.train:
                    pending["stream"] = where()
        if samples and not self.train:
            if pending is not None:
                yield pending
            pending = self.collate(samples, skips)
        if pending is not None:
            pending["skipped"] = dict(Counter(pending["skipped"]) + Counter(skips.take()))
            yield pending
        elif skips:  # no batch to carry the skips: an empty one does, so that every one is counted
            if pos is None:
                warnings.warn(
                    f"loader worker {worker}: no usable batch in {shards}; skipped {dict(skips.counts)}"
                )
            empty = skip_carrier(skips.take())
            if self.train:
                empty["stream"] = where()
            yield empty

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot, n_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = worker_of(slot, self.first_worker, n_workers)
        pos = resume_state.worker_position(self.resume, worker)
        batches = self._batches(worker_shards(self.shards, worker, n_workers), worker, pos)
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


def init_worker(threads: int, _worker_id: int, *, main_pid: int | None = None) -> None:
    """A loader worker's ``worker_init_fn`` (with ``functools.partial`` for ``threads`` and
    ``main_pid``, the pid of the process that iterates the loader; default: the parent)."""
    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group; the main process handles it (a training run
    # checkpoints first) and then stops the workers, so they must not die of it on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sigterm_from_main_only(os.getppid() if main_pid is None else main_pid)


def worker_init_fn(threads: int, workers: int) -> Callable[[int], None] | None:
    """The ``worker_init_fn`` of a loader with ``workers`` worker processes (None without any):
    ``init_worker`` with ``threads`` and this process as the workers' main process."""
    return functools.partial(init_worker, threads, main_pid=os.getpid()) if workers else None


def sigterm_from_main_only(main_pid: int) -> None:
    """In a loader worker: die of a SIGTERM that the main process sends, ignore any other.

    A job's SIGTERM from SLURM (scancel, a time limit), timeout(1) or ``kill -- -PGID`` reaches
    every process of the job. A worker that died of it ended the training run ("DataLoader
    worker ... is killed by signal: Terminated", raised in the middle of a step) before the main
    process could write the checkpoint that its own SIGTERM handler promises. The main process
    stops its workers itself once it has saved; and when it ends a worker with SIGTERM (torch's
    ``terminate()`` of a stuck worker, multiprocessing's exit), that one still kills. A signal
    handler cannot tell who sent a signal, so SIGTERM is blocked and a thread reads each one
    with its sender (``sigwaitinfo``). Call it from the worker's main thread, before any other
    thread starts: threads inherit the blocked signal.
    """
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: SIGTERM keeps its default action
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender in (main_pid, os.getpid()):
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # this thread only
                os.kill(os.getpid(), signal.SIGTERM)  # the default action: the worker ends

    threading.Thread(target=wait, name="clipkit-sigterm", daemon=True).start()


def identity(batch: dict[str, Any]) -> dict[str, Any]:
    """The ``collate_fn`` of a loader whose workers yield whole batches."""
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
    """One epoch over the shards of ``urls`` as batch dicts (see module docstring); with
    ``train`` and ``cfg.resampled``, an endless stream of resampled shards instead.

    ``feature_lookup`` (``key in lookup``, ``lookup.get(key) -> (F,) array``) replaces image
    decoding by cached locked-tower features: batches then carry ``"image_features"``. A lookup
    with ``views`` > 1 (``train.cache_views``) serves, in train mode, one view per sample drawn
    from (seed, epoch, key) (``clipkit.data.augment.draw_view``), else view 0.
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
    if train:  # a bad template file fails here, in the main process, before any batch
        resolve_templates(cfg.caption_templates)
    sources = None
    if train and cfg.resampled:  # every (rank, worker) draws from all shards: no minimum
        sources = source_lists(urls, cfg.train_weights)
        shards, workers = [u for source in sources for u in source], cfg.workers
    else:
        all_urls = expand_urls(urls)
        shards = rank_shards(
            all_urls, workers=cfg.workers, train=train, seed=seed, epoch=epoch, rank=rank, world=world_size
        )
        workers = min(cfg.workers, len(shards))  # eval: a worker without shards would idle
    readers = max(1, workers)
    resume = resume_state.usable(resume, shards, readers, epoch, resampled=sources is not None)
    progress = multiprocessing.RawArray("q", 2 * readers)  # written by the workers, read by the watchdog
    dataset = ShardDataset(
        shards, cfg, image_transform, tokenize, train=train, seed=seed, epoch=epoch, rank=rank,
        feature_lookup=feature_lookup, resume=resume, progress=progress, sources=sources,
    )  # fmt: skip
    if workers > 0:
        # Forked workers tokenize; a tokenizer thread pool inherited across fork can deadlock.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        dataset,
        batch_size=None,  # batches are built inside the workers
        num_workers=workers,
        collate_fn=identity,
        worker_init_fn=worker_init_fn(cfg.threads_per_worker, workers),
        generator=torch.Generator().manual_seed(seeded_rng(seed, epoch, rank, "torch").getrandbits(62)),
        pin_memory=torch.cuda.is_available(),
    )
    loader.shards = shards  # type: ignore[attr-defined]
    loader.readers = readers  # type: ignore[attr-defined]
    loader.progress = progress  # type: ignore[attr-defined]
    loader.resumed = resume is not None  # type: ignore[attr-defined]
    loader.resampled = sources is not None  # type: ignore[attr-defined]
    loader.num_samples = dataset_size(shards) if shards else 0  # type: ignore[attr-defined]
    return loader
