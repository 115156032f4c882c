"""Shard assignment: which (rank, worker) reads which shards, in which order, in each epoch.

In train mode the shard list is shuffled identically on every rank (seeded by seed and
epoch), dealt round-robin to the ranks, then each rank's list round-robin to its workers:
every shard is read by exactly one (rank, worker) per epoch, and every reader gets at least
one shard. Eval mode keeps the file order (a worker may then get no shard).
"""

from __future__ import annotations

from clipkit.data.shuffle import seeded_rng
from clipkit.data.skips import DataError


def rank_shards(
    urls: list[str], *, workers: int, train: bool, seed: int, epoch: int, rank: int, world: int
) -> list[str]:
    """Rank ``rank``'s shards of ``urls`` (of ``world`` ranks with ``workers`` loader workers each)."""
    readers = max(1, workers) * world
    if train and len(urls) < readers:
        fix = (
            f"or set data.workers={len(urls) // world}"
            if len(urls) >= world
            else "there are fewer shards than ranks, so only resharding helps"
        )
        raise DataError(
            f"{len(urls)} shard(s) for {world} rank(s) x {max(1, workers)} loader worker(s) = "
            f"{readers} readers; in training every reader needs its own shard(s). Write at least "
            f"{readers} shards (a smaller ShardWriter maxcount), {fix}, or set data.resampled=true "
            "(every reader draws shards with replacement)"
        )
    if train:
        urls = list(urls)
        seeded_rng(seed, epoch, "shards").shuffle(urls)
    return urls[rank::world]


def worker_shards(shards: list[str], worker: int, readers: int) -> list[str]:
    """Worker ``worker``'s shards of its rank's ``shards`` (``readers`` workers on the rank)."""
    return shards[worker::readers]


def worker_of(slot: int, first: int, readers: int) -> int:
    """The worker that DataLoader worker ``slot`` plays when slot 0 plays worker ``first``.

    Batches come round-robin from the DataLoader's workers; a resumed pass starts the
    round-robin with the worker whose batch was next by giving slot 0 that worker's part.
    """
    return (slot + first) % readers
