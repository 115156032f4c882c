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
- Each pass is seeded with ``stream_seed(train.seed, epoch, step the pass started at)``. A
  resumed run restarts the interrupted epoch's stream reseeded with the checkpoint's step: the
  continuation is deterministic (same checkpoint -> same run) and reaches the same final step
  and samples count as an uninterrupted run, though not the same sample order (exact
  mid-epoch stream positions are not restored yet).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from clipkit.data.stats import SkipStats
from clipkit.errors import ClipkitError

LoaderFactory = Callable[[int, int], Iterable[dict[str, Any]]]  # (seed, epoch) -> batches


def stream_seed(seed: int, epoch: int, start_step: int) -> int:
    """Stable 31-bit seed of the pass over the shards that epoch ``epoch`` starts at step ``start_step``."""
    digest = hashlib.sha256(f"clipkit-stream/{seed}/{epoch}/{start_step}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def steps_for(samples: int, per_step: int) -> int:
    """Optimizer steps needed for a budget of ``samples`` with ``per_step`` samples each (last one cut)."""
    return -(-samples // per_step)


def trim(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a batch (tensors and lists cut on dim 0; ``skipped`` kept)."""
    out = {}
    for k, v in batch.items():
        out[k] = v[:n] if isinstance(v, (torch.Tensor, list)) else v
    return out


class TrainStream:
    """Endless full micro-batches; ``next_batch(step)`` opens a new pass when one ends.

    ``all_ranks_have(bool) -> bool``: True when every rank got a batch (with one rank, the
    identity); a pass ends on all ranks together, so no rank waits in a collective alone.
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
    ):
        self.make_loader = make_loader
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.start_step = start_step
        self.all_ranks_have = all_ranks_have
        self.skip = skip if skip is not None else SkipStats()
        self.dropped = 0  # samples of short batches at the end of passes
        self._it: Iterator[dict[str, Any]] | None = None
        self._full = 0  # full batches in the current pass

    def _fetch(self) -> dict[str, Any] | None:
        assert self._it is not None
        for batch in self._it:
            self.skip.update(batch)
            if len(batch["key"]) == self.batch_size:
                return batch
            self.dropped += len(batch["key"])
        return None

    def next_batch(self, step: int) -> dict[str, Any]:
        """The next full batch; ``step`` (optimizer steps done) seeds a pass that has to start now."""
        while True:
            if self._it is None:
                seed = stream_seed(self.seed, self.epoch, self.start_step)
                self._it = iter(self.make_loader(seed, self.epoch))
                self._full = 0
            batch = self._fetch()
            if self.all_ranks_have(batch is not None):
                self._full += 1
                return batch  # type: ignore[return-value]
            if batch is not None:  # another rank's pass ended: this batch is left over
                self.dropped += len(batch["key"])
            if self._full == 0:
                raise ClipkitError(
                    f"a whole pass over data.train gave no full batch of data.batch_size={self.batch_size} "
                    f"on some rank ({self.skip.report()}); lower data.batch_size or add shards"
                )
            self.epoch += 1
            self.start_step = step
            self._it = None
