"""Resampled shards and weighted mixtures (``data.resampled``, ``data.train_weights``): one loader
worker's endless stream of raw samples.

Per (rank, worker), each source i (a ``"::"``-part of data.train when weights are given, else
all its shards as one source) is read as::

    shard RNG (seed, rank, worker, i) -> a shard drawn with replacement -> its samples in order
        -> [shuffle buffer, RNG (seed, rank, worker, i, "samples")]

and a choice RNG (seed, rank, worker, "mix") picks the source of every sample, source i with
probability ``weight_i / sum(weights)`` whatever the sources' sizes (webdataset's
``ResampledShards`` + ``RandomMix``, with every RNG state in the position). Nothing ends: every
(rank, worker) reads from all shards, so there is no shard minimum, and no passes.

A raw sample also carries ``"__src__"`` (its source) and ``"__draw__"`` = (rank, worker,
source, draw number): its random crop and caption augmentation are seeded with it, so a shard
drawn twice is not augmented twice the same way.

Exact resume: ``ResampledMix.position()`` after a batch is plain data::

    {"worker", "batches", "samples", "resampled": True, "choice": the choice RNG's state,
     "sources": [{"draws": shards drawn so far, "shard": index in the source of the one being
                  read (-1: none), "offset": its samples consumed, "rng": the shard RNG's state,
                  "buffer": {"held": [[shard, number, draw], ...], "draining", "rng"} or None}]}

``restore`` puts it back: the shard being read continues at its offset, and the buffers are
refilled with the very samples they held, read again from the shards they came from.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

from clipkit.data.reader import ShardReader
from clipkit.data.resume import Cursor, refetch
from clipkit.data.shuffle import ShuffleBuffer, rng_state, seeded_rng, set_rng_state
from clipkit.data.skips import DataError
from clipkit.data.urls import expand_urls

# (a source's shard list, a cursor) -> a reader of those shards that keeps the cursor
ReaderFactory = Callable[[list[str], Cursor], ShardReader]


def source_lists(spec: str, weights: list[float]) -> list[list[str]]:
    """The sources of a training spec: with ``weights``, one per ``"::"``-part (one weight
    each); without, all the spec's shards as one source."""
    if not weights:
        return [expand_urls(spec)]
    parts = [p for p in spec.split("::") if p.strip()]
    if len(parts) != len(weights):
        raise DataError(
            f"data.train_weights has {len(weights)} weight(s) but the training spec has {len(parts)} "
            "'::'-separated source(s); give one weight per source"
        )
    return [expand_urls(p) for p in parts]


class ResampledSource:
    """Endless raw samples of one source for one (rank, worker): shards drawn with replacement.

    ``first``: the index of this source's first shard in the loader's flat shard list (the
    stall watchdog's ``progress[2 w]`` names the shard being read by that index).
    """

    def __init__(
        self,
        index: int,
        shards: list[str],
        reader: ShardReader,
        rng: random.Random,
        buffer: ShuffleBuffer | None,
        tag: tuple[int, int],
        first: int,
    ):
        self.index, self.shards, self.reader, self.rng, self.buffer = index, shards, reader, rng, buffer
        self.tag, self.first = tag, first  # (rank, worker)
        self.cursor = reader.cursor  # shard: index in self.shards of the one being read (-1: none)
        self.cursor.shard, self.cursor.offset = -1, 0
        self.draws = 0  # shards drawn so far: the one being read is draw number draws - 1
        # A source whose shards give no sample would be drawn from forever: fail instead.
        self.empty_limit = 8 * len(shards) + 16

    def _draw(self, sample: dict[str, Any], draw: int) -> dict[str, Any]:
        sample["__src__"] = self.index
        sample["__draw__"] = (*self.tag, self.index, draw)
        return sample

    def raw(self) -> Iterator[dict[str, Any]]:
        """The samples of one drawn shard after another, without end (before the buffer)."""
        cursor, empty = self.cursor, 0
        while True:
            if cursor.shard < 0:
                cursor.shard, cursor.offset = self.rng.randrange(len(self.shards)), 0
                self.draws += 1
            fresh, got = cursor.offset == 0, False
            progress = self.reader.progress
            if progress is not None:
                progress[2 * cursor.worker] = self.first + cursor.shard
            for sample in self.reader.read_shard(self.shards[cursor.shard]):
                got = True
                yield self._draw(sample, self.draws - 1)
            empty = 0 if got else empty + fresh
            if empty >= self.empty_limit:
                raise DataError(
                    f"training source {self.index} ({len(self.shards)} shard(s), e.g. '{self.shards[0]}'): "
                    f"the last {empty} shards drawn gave no sample (skipped: {dict(self.reader.skips.counts)}); "
                    "rebuild its shards or remove it from data.train"
                )
            cursor.shard, cursor.offset = -1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.raw() if self.buffer is None else self.buffer(self.raw())

    def state_dict(self) -> dict[str, Any]:
        def ref(sample: dict[str, Any]) -> list[int]:
            return [*sample["__pos__"], sample["__draw__"][-1]]  # [shard, number, draw]

        return {
            "draws": self.draws,
            "shard": self.cursor.shard,
            "offset": self.cursor.offset,
            "rng": rng_state(self.rng),
            "buffer": self.buffer.state_dict(ref) if self.buffer is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
        self.cursor.shard, self.cursor.offset = int(state["shard"]), int(state["offset"])
        set_rng_state(self.rng, state["rng"])
        if self.buffer is None or state["buffer"] is None:
            return
        held = [(int(s), int(n), int(d)) for s, n, d in state["buffer"]["held"]]
        found = refetch([(s, n) for s, n, _ in held], self.shards, self.reader.fetch)
        # A shard drawn twice can put the same sample in the buffer twice: one dict each.
        self.buffer.load_state_dict(state["buffer"], [self._draw(dict(found[(s, n)]), d) for s, n, d in held])


class ResampledMix:
    """One worker's raw samples: source i with probability ``weights[i] / sum(weights)``.

    ``cursor``: the worker's (``worker``, ``batches``, ``samples``; its shard and offset are
    unused). An endless stream never runs dry, so a worker whose samples all fail to decode
    (say, a wrong data.image_keys) would never fill a batch: after ``unusable_limit`` samples
    without a batch going out, it raises.
    """

    def __init__(
        self,
        sources: list[ResampledSource],
        weights: list[float],
        rng: random.Random,
        cursor: Cursor,
        unusable_limit: int,
    ):
        self.sources, self.rng, self.cursor = sources, rng, cursor
        self.cum = list(itertools.accumulate(weights or [1.0]))
        self.unusable_limit = unusable_limit

    def __iter__(self) -> Iterator[dict[str, Any]]:
        streams = [iter(s) for s in self.sources]
        choices = range(len(streams))
        since, batches = 0, self.cursor.batches  # samples yielded since the worker's last batch
        while True:
            if self.cursor.batches != batches:
                since, batches = 0, self.cursor.batches
            if since >= self.unusable_limit:
                skips = self.sources[0].reader.skips
                raise DataError(
                    f"loader worker {self.cursor.worker}: {since} training samples in a row were unusable "
                    f"(skipped: {dict(skips.counts)}); check data.image_keys / data.caption_key "
                    "against the shards' members"
                )
            i = 0 if len(streams) == 1 else self.rng.choices(choices, cum_weights=self.cum)[0]
            since += 1
            yield next(streams[i])

    def position(self) -> dict[str, Any]:
        """The worker's position now (after the batch just built); see the module docstring."""
        cursor = self.cursor
        return {
            "worker": cursor.worker,
            "batches": cursor.batches,
            "samples": cursor.samples,
            "resampled": True,
            "choice": rng_state(self.rng),
            "sources": [s.state_dict() for s in self.sources],
        }

    def restore(self, pos: dict[str, Any]) -> None:
        """Continue from a ``position`` (before iterating)."""
        if len(pos["sources"]) != len(self.sources):
            raise DataError(
                f"cannot continue the data stream where the checkpoint left it: it mixed "
                f"{len(pos['sources'])} source(s), data.train now has {len(self.sources)}"
            )
        self.cursor.batches, self.cursor.samples = int(pos["batches"]), int(pos["samples"])
        set_rng_state(self.rng, pos["choice"])
        for source, state in zip(self.sources, pos["sources"]):
            source.load_state_dict(state)


def resampled_mix(
    sources: list[list[str]],
    weights: list[float],
    reader_of: ReaderFactory,
    cursor: Cursor,
    *,
    seed: int,
    rank: int,
    shuffle_buffer: int,
    batch_size: int,
) -> ResampledMix:
    """Worker ``cursor.worker``'s mix of ``sources`` (shard lists; see the module docstring)."""
    worker, parts, first = cursor.worker, [], 0
    for i, shards in enumerate(sources):
        buffer = None
        if shuffle_buffer > 1:
            buffer = ShuffleBuffer(shuffle_buffer, seeded_rng(seed, rank, worker, i, "samples"))
        reader = reader_of(shards, Cursor(worker))
        rng = seeded_rng(seed, rank, worker, i, "shards")
        parts.append(ResampledSource(i, shards, reader, rng, buffer, (rank, worker), first))
        first += len(shards)
    limit = 100 * batch_size + 1000
    return ResampledMix(parts, weights, seeded_rng(seed, rank, worker, "mix"), cursor, limit)
