"""The training stream: full micro-batches over the training shards, epoch after epoch, until the budget.

Training length is a budget of samples (``train.samples``), not a number of epochs:

- An *epoch* is one pass over the training shards. When a pass ends the stream restarts
  with ``epoch + 1`` (a new shard order and sample shuffle) and carries on.
- Every micro-batch is full (``data.batch_size`` per rank). The short batch a pass may end
  with is dropped (counted in ``dropped``), so every optimizer step but the last holds exactly
  ``batch_size * world_size * accum_steps`` samples and the number of steps depends on the
  budget alone: ``ceil(samples / that)``. The last step is cut to the samples left, so
  ``samples_seen == train.samples`` exactly at the end (with several ranks the budget is
  rounded up to a multiple of ``world_size``: every rank needs the same batch size).
- Each pass is seeded with ``stream_seed(train.seed, epoch, 0)``; the shard order, each
  (rank, worker)'s shards and its sample shuffle follow from that seed. (A pass restarted from
  a checkpoint without stream positions is reseeded with the checkpoint's step in place of 0,
  and checkpoints of earlier versions hold the step their pass started at: the state keeps
  ``start_step`` for both.) The seed does not depend on when a pass starts, so the next pass
  is known before the current one ends.
- Opening a pass ahead. A pass's loader workers start (fork, open their shards, fill the
  shuffle buffer, decode a first batch) before its first batch comes out. With loader
  workers, when the current pass is about to end (every worker has read all its shards:
  what is left is in their shuffle buffers and prefetched batches), the stream opens the next
  pass's loader, so its workers start while the last batches are
  trained on and the step that opens the pass does not wait for them. (On one H200, the
  10-step rows of ViT-B/32 that held a pass boundary ran at 1,001-1,153 samples/s against
  2,655-3,055 for the others before; the whole run went from 1,962 to 2,443 samples/s,
  ``benchmarks/RESULTS.md``.) The batches are the same either way. Off (``open_ahead=False``) for loader factories whose next
  pass depends on the training so far (hard-negative mining reads the model at the boundary).
- With ``data.resampled`` (``clipkit.data.resample``) the loader never ends: there is one
  endless pass, the epoch stays 0 and nothing is dropped; ``train.samples`` alone sets the
  length. Batches then carry each sample's source, and the stream counts the trained samples
  per source (``count_sources``, ``sources_seen``: metrics.csv's ``samples_src<i>``).

Model inputs and bookkeeping. A loader batch is one dict; the stream reads its bookkeeping
(``"skipped"`` into ``skip``, ``"stream"`` into the resume state, ``"key"`` for the batch
size), and ``split_inputs`` parts what the loop takes from it into the model inputs
(``MODEL_INPUTS``), the only keys that reach the model and the loss, and a ``BatchMeta``
beside them (keys, epoch, skips) for the sample log and the sample count.

Exact resume. Every batch carries its worker's position after it (``"stream"``, see
``clipkit.data.resume``: shard being read, samples of it consumed, the shuffle buffer's
samples by (shard, number) and its RNG state). ``state_dict()`` keeps the last position of
every worker of the pass, the worker whose batch comes next (batches arrive round-robin from
the workers), the rank's shard list and the pass seed's inputs. A resumed run reopens the
same pass with each worker continuing right after its last consumed batch (shards before
it are not opened, samples before it in its shard are not decoded) and the round-robin
going on with the same worker: the batches are the ones the interrupted run would have had,
so with ``train.deterministic`` the final weights are bit-identical to an uninterrupted run.
A checkpoint from before exact resume (no ``"stream"``) restarts the interrupted epoch's
stream reseeded with the checkpoint's step, as earlier versions did.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from clipkit.data.assign import worker_shards
from clipkit.data.stats import SkipStats
from clipkit.errors import ClipkitError

# (seed, epoch, resume position or None) -> batches; see clipkit.data.pipeline.build_loader.
LoaderFactory = Callable[[int, int, "dict[str, Any] | None"], Iterable[dict[str, Any]]]


def stream_seed(seed: int, epoch: int, start_step: int) -> int:
    """Stable 31-bit seed of the pass over the shards that epoch ``epoch`` starts at step ``start_step``."""
    digest = hashlib.sha256(f"clipkit-stream/{seed}/{epoch}/{start_step}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def steps_for(samples: int, per_step: int) -> int:
    """Optimizer steps needed for a budget of ``samples`` with ``per_step`` samples each (last one cut)."""
    return -(-samples // per_step)


MODEL_INPUTS = ("image", "image_features", "image_activations", "text", "idx")  # what model and loss may read
BOOKKEEPING = ("key", "skipped", "epoch", "stream", "source")  # what the loader and the stream add


@dataclass
class BatchMeta:
    """What travels beside a batch's model inputs: its sample keys, the pass it came from and
    the samples its worker skipped before it (already counted by the stream), and, resampled,
    each sample's source."""

    keys: list[str]
    epoch: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    sources: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


def split_inputs(batch: dict[str, Any], epoch: int | None = None) -> tuple[dict[str, Any], BatchMeta]:
    """A loader batch -> ``(model inputs, bookkeeping)``; the only place the two part.

    The inputs hold only ``MODEL_INPUTS`` (``image``, ``image_features`` or ``image_activations``,
    ``text``, ``idx``), which is all that may reach the model and the loss. ``epoch`` defaults to
    the batch's own ``"epoch"`` (0 when it has none). A key that is neither raises: nothing rides
    along unseen.
    """
    unknown = sorted(set(batch) - set(MODEL_INPUTS) - set(BOOKKEEPING))
    if unknown:
        raise ValueError(
            f"batch key(s) {', '.join(map(repr, unknown))} are neither model inputs "
            f"({', '.join(MODEL_INPUTS)}) nor loader bookkeeping ({', '.join(BOOKKEEPING)})"
        )
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    meta = BatchMeta(
        keys=list(batch.get("key", [])),
        epoch=int(batch.get("epoch", 0) if epoch is None else epoch),
        skipped=dict(batch.get("skipped", {})),
        sources=list(batch.get("source", [])),
    )
    return inputs, meta


def trim(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a batch (tensors and lists cut on dim 0; ``skipped`` kept)."""
    out = {}
    for k, v in batch.items():
        out[k] = v[:n] if isinstance(v, (torch.Tensor, list)) else v
    return out


class TrainStream:
    """Endless full micro-batches; ``next_batch()`` opens a new pass when one ends.

    ``all_ranks_have(bool) -> bool``: True when every rank got a batch (with one rank, the
    identity); a pass ends on all ranks together, so no rank waits in a collective alone.
    ``waiting_since`` is the ``time.monotonic()`` at which the loop started waiting for the
    batch it is waiting for, None when it is not waiting (the stall watchdog reads it).
    ``open_ahead``: open the next pass's loader before the current pass ends (module docstring).
    """

    def __init__(
        self,
        make_loader: LoaderFactory,
        batch_size: int,
        seed: int,
        epoch: int = 0,
        start_step: int = 0,
        all_ranks_have: Callable[[bool], bool] = lambda ok: ok,
        skip: SkipStats | None = None,
        open_ahead: bool = True,
    ):
        self.make_loader = make_loader
        self.open_ahead = open_ahead
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.start_step = start_step
        self.all_ranks_have = all_ranks_have
        self.skip = skip if skip is not None else SkipStats()
        self.dropped = 0  # samples of short batches at the end of passes
        self.waiting_since: float | None = None
        self.loader: Any = None
        self._it: Iterator[dict[str, Any]] | None = None
        self._full = 0  # full batches in the current pass
        self._positions: list[dict[str, Any] | None] = []  # per worker, after its last consumed batch
        self._next_worker = 0
        self._resume: dict[str, Any] | None = None  # for the next pass opened (load_state_dict)
        self.sources_seen: list[int] = []  # resampled: this rank's trained samples per source
        self._ahead: tuple[int, Any, Iterator[dict[str, Any]]] | None = None  # (epoch, loader, iterator)
        self._reader_shards: list[int] = []  # the current pass: shards of each worker (reader)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands between two batches; plain data (a checkpoint entry)."""
        # Loaders other than build_loader's (e.g. hard-negative passes) keep no positions.
        exact = self._it is not None and hasattr(self.loader, "resumed")
        return {
            "epoch": self.epoch,
            "start_step": self.start_step,
            "full": self._full,
            "shards": list(self.loader.shards) if exact else [],
            "readers": int(self.loader.readers) if exact else 0,
            "next_worker": self._next_worker,
            "positions": list(self._positions) if exact else None,
            "sources": list(self.sources_seen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.start_step = int(state["epoch"]), int(state["start_step"])
        self.sources_seen = [int(n) for n in state.get("sources", [])]
        self._it = None
        if state.get("positions") is not None:
            self._resume = {k: state[k] for k in ("shards", "readers", "next_worker", "positions")}
            self._full = int(state["full"])

    def count_sources(self, metas: Iterable[BatchMeta]) -> None:
        """Add the trained micro-batches' samples to ``sources_seen`` (resampled batches only)."""
        for meta in metas:
            for source in meta.sources:
                self.sources_seen.extend([0] * (source + 1 - len(self.sources_seen)))
                self.sources_seen[source] += 1

    def close(self) -> None:
        """Stop this pass's loader workers now. A run that stops early (a signal, an error)
        would otherwise leave them to the interpreter's exit, which ends them with SIGTERM, and
        torch's SIGCHLD handler reports that as a crash ("DataLoader worker ... is killed by
        signal") over the run's own exit status. For the end of a run: asked for a batch after
        this, the stream would open its current epoch's pass again from the start. Calls torch's
        private ``_shutdown_workers``, which the iterator's ``__del__`` also calls, so that the
        workers stop here even while a traceback still holds the iterator."""
        it, self._it = self._it, None
        ahead, self._ahead = self._ahead, None
        for each in (it, ahead[2] if ahead else None):
            _stop_workers(each)

    # ------------------------------------------------------------------ batches

    def _open(self) -> None:
        resume, self._resume = self._resume, None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (ahead[0] != self.epoch or resume is not None or self.start_step):
            _stop_workers(ahead[2])  # opened for another pass than the one starting (a reload)
            ahead = None
        if ahead is not None:  # opened ahead (_open_next): its workers are running already
            _, self.loader, it = ahead
        else:
            seed = stream_seed(self.seed, self.epoch, self.start_step)
            self.loader, it = self.make_loader(seed, self.epoch, resume), None
        self._reader_shards = _reader_shards(self.loader)
        if resume is not None and not hasattr(self.loader, "resumed"):
            warnings.warn(
                f"this pass's loader ({type(self.loader).__name__}) cannot continue a pass exactly: epoch "
                f"{self.epoch} starts over (samples of it seen before the checkpoint are seen again)",
                stacklevel=3,
            )
        if resume is not None and getattr(self.loader, "resumed", False):
            self._positions = list(resume["positions"])
            self._next_worker = int(resume["next_worker"])
        else:  # a new pass (or one that cannot be continued exactly: it starts over)
            self._positions = [None] * int(getattr(self.loader, "readers", 1))
            self._next_worker = 0
            self._full = 0
        self._it = iter(self.loader) if it is None else it

    def _open_next(self) -> None:
        """Open the next pass's loader now when the current pass is about to end (see the module
        docstring): its workers start while the current pass's last batches are trained on."""
        loader = self.loader
        if not self.open_ahead or self._ahead is not None or int(getattr(loader, "num_workers", 0)) < 1:
            return  # off, done already, or no workers to start early
        progress, lengths = getattr(loader, "progress", None), self._reader_shards
        if progress is None or not lengths or any(progress[2 * w] < n for w, n in enumerate(lengths)):
            return  # a worker still reads its shards (or the loader does not say: resampled)
        epoch = self.epoch + 1
        nxt = self.make_loader(stream_seed(self.seed, epoch, 0), epoch, None)
        self._ahead = (epoch, nxt, iter(nxt))

    def _fetch(self) -> dict[str, Any] | None:
        assert self._it is not None
        for batch in self._it:
            self.skip.update(batch)
            pos = batch.pop("stream", None)
            if pos is not None and pos["worker"] < len(self._positions):
                self._positions[pos["worker"]] = pos
                self._next_worker = (pos["worker"] + 1) % len(self._positions)
            if len(batch["key"]) == self.batch_size:
                return batch
            self.dropped += len(batch["key"])
        return None

    def next_batch(self) -> dict[str, Any]:
        """The next full batch (of the next pass when the current one has ended)."""
        self.waiting_since = time.monotonic()
        try:
            return self._next_batch()
        finally:
            self.waiting_since = None

    def _next_batch(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._open()
            batch = self._fetch()
            if self.all_ranks_have(batch is not None):
                self._full += 1
                self._open_next()
                return batch  # type: ignore[return-value]
            if batch is not None:  # another rank's pass ended: this batch is left over
                self.dropped += len(batch["key"])
            if self._full == 0:
                raise ClipkitError(
                    f"a whole pass over data.train gave no full batch of data.batch_size={self.batch_size} "
                    f"on some rank ({self.skip.report()}); lower data.batch_size or add shards"
                )
            self.epoch += 1
            self.start_step = 0  # a pass from its beginning: seeded with (seed, epoch, 0)
            _stop_workers(self._it)  # the finished pass's workers (torch's own stop, or now)
            self._it = None

    def waiting_on(self) -> str:
        """Which worker the next batch comes from and where it reads, in words (for the watchdog)."""
        loader = self.loader
        if loader is None or not self._positions:
            return "the data loader is starting"
        w, n = self._next_worker, len(self._positions)
        who = (
            f"loader worker {w} of {n}"
            if n > 1 or getattr(loader, "num_workers", 0)
            else "the loader (in this process)"
        )
        progress = getattr(loader, "progress", None)
        shards = list(getattr(loader, "shards", []))
        if not getattr(loader, "resampled", False):  # resampled: progress indexes all the shards
            shards = worker_shards(shards, w, n)
        if progress is None:
            return who
        shard, sample = int(progress[2 * w]), int(progress[2 * w + 1])
        if shard >= len(shards):
            return f"{who}, which has read all its {len(shards)} shard(s)"
        return f"{who}, reading shard '{shards[shard]}' (sample {sample})"


def _stop_workers(it: Any) -> None:
    """Stop a loader iterator's worker processes now (torch's private ``_shutdown_workers``,
    which its ``__del__`` also calls; nothing for an in-process iterator)."""
    shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()


def _reader_shards(loader: Any) -> list[int]:
    """How many shards each of ``loader``'s workers reads in a pass ([] when it does not say, or
    when its workers draw from all shards, resampled)."""
    shards, readers = getattr(loader, "shards", None), int(getattr(loader, "readers", 0) or 0)
    if shards is None or readers < 1 or getattr(loader, "resampled", False):
        return []
    return [len(worker_shards(list(shards), w, readers)) for w in range(readers)]
