"""Exact resume: a loader worker's position after each batch, and putting one back.

A worker's pass is a function of (seed, epoch, rank, worker): its shards, their order and
its shuffle buffer's RNG. Its position after a batch (``position``, plain data for a
checkpoint) is::

    {"worker", "shard": index in the worker's shard list, "offset": samples of it consumed,
     "batches", "samples": what the worker has yielded,
     "held": the shuffle buffer's samples as [shard, number], "draining", "rng": its RNG state}

``restore`` continues a fresh worker from such a position: the cursor skips what was read,
and the buffer is refilled with the very samples it held (read again from the few shards
they came from). A pass resumed with ``resume = {"shards", "readers", "next_worker",
"positions"}`` must read the same shards with the same number of workers (``usable``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clipkit.data.shuffle import ShuffleBuffer
from clipkit.data.skips import DataError

# (shard index in the worker's list, sample numbers wanted) -> {number: raw sample} of those found
Fetch = Callable[[int, set[int]], dict[int, dict[str, Any]]]


@dataclass
class Cursor:
    """Where one worker's pass stands: the shard being read (index in the worker's list), the
    samples of it consumed (numbers of ``tario.iter_numbered_samples``), what went out."""

    worker: int
    shard: int = 0
    offset: int = 0
    batches: int = 0
    samples: int = 0

    def count_batch(self, size: int) -> None:
        self.batches, self.samples = self.batches + 1, self.samples + size


def sample_ref(sample: dict[str, Any]) -> list[int]:
    """How a held sample is named in a position: ``[shard, number]`` (its ``"__pos__"``)."""
    return list(sample["__pos__"])


def position(cursor: Cursor, buffer: ShuffleBuffer | None) -> dict[str, Any]:
    """The worker's position now (after the batch just built): enough to continue right after it."""
    held = buffer.state_dict(sample_ref) if buffer else {"held": [], "draining": False, "rng": None}
    return {
        "worker": cursor.worker,
        "shard": cursor.shard,
        "offset": cursor.offset,
        "batches": cursor.batches,
        "samples": cursor.samples,
        **held,
    }


def restore(
    pos: dict[str, Any], cursor: Cursor, buffer: ShuffleBuffer | None, shards: list[str], fetch: Fetch
) -> None:
    """Put a ``position`` back into a fresh ``cursor`` and ``buffer`` of the worker whose list is
    ``shards``; ``fetch`` reads the held samples again (only from the shards they came from)."""
    cursor.shard, cursor.offset = int(pos["shard"]), int(pos["offset"])
    cursor.batches, cursor.samples = int(pos["batches"]), int(pos["samples"])
    if buffer is None:
        return
    held = [(int(s), int(n)) for s, n in pos["held"]]
    found = refetch(held, shards, fetch)
    buffer.load_state_dict(pos, [found[p] for p in held])


def refetch(
    held: list[tuple[int, int]], shards: list[str], fetch: Fetch
) -> dict[tuple[int, int], dict[str, Any]]:
    """The samples ``held`` names as (shard index in ``shards``, number), read again with
    ``fetch`` (each shard opened once); a sample that is gone is a ``DataError``."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for shard in sorted({s for s, _ in held}):
        for number, sample in fetch(shard, {n for s, n in held if s == shard}).items():
            found[(shard, number)] = sample
    missing = [p for p in held if p not in found]
    if missing:
        s, n = missing[0]
        raise DataError(
            f"cannot continue the data stream where the checkpoint left it: sample {n} of shard "
            f"'{shards[s]}' is gone ({len(missing)} samples missing); the shards changed since "
            "the checkpoint was written"
        )
    return found


def usable(
    resume: dict[str, Any] | None, shards: list[str], readers: int, epoch: int, resampled: bool = False
) -> dict[str, Any] | None:
    """``resume`` when it continues a pass over these ``shards`` with these ``readers`` (and
    positions of the same kind: resampled or not); else a warning and None (the pass starts over)."""
    if resume is None:
        return None
    kinds = {bool(p.get("resampled")) for p in resume["positions"] if p is not None}
    if list(resume["shards"]) == shards and int(resume["readers"]) == readers and kinds <= {resampled}:
        return resume
    warnings.warn(
        f"cannot continue epoch {epoch} of the data stream exactly: the checkpoint read "
        f"{len(resume['shards'])} shard(s) with {resume['readers']} reader(s) on this rank"
        f"{', resampled' if True in kinds else ''}, now {len(shards)} with {readers}"
        f"{', resampled' if resampled else ''} (data.train, data.workers or data.resampled changed); "
        "the pass starts over",
        stacklevel=3,
    )
    return None


def worker_position(resume: dict[str, Any] | None, worker: int) -> dict[str, Any] | None:
    """Worker ``worker``'s position in ``resume`` (None: it starts its pass from the beginning)."""
    positions = resume["positions"] if resume else []
    return positions[worker] if worker < len(positions) else None
