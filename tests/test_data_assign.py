"""Shard assignment: every shard read by exactly one (rank, worker) per epoch, in a seeded order."""

from __future__ import annotations

from collections import Counter

import pytest

from clipkit.data.assign import rank_shards, worker_of, worker_shards
from clipkit.data.skips import DataError

URLS = [f"s-{i:03d}.tar" for i in range(13)]  # 13: no layout divides it evenly


def readers(urls: list[str], *, world: int, workers: int, **kw) -> dict[tuple[int, int], list[str]]:
    """Every (rank, worker)'s shard list, in reading order."""
    out = {}
    for rank in range(world):
        mine = rank_shards(urls, workers=workers, rank=rank, world=world, **kw)
        for w in range(max(1, workers)):
            out[(rank, w)] = worker_shards(mine, w, max(1, workers))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 4])
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_every_shard_exactly_once_per_epoch_across_ranks_and_workers(world, workers, epoch):
    got = readers(URLS, world=world, workers=workers, train=True, seed=3, epoch=epoch)
    assert len(got) == world * max(1, workers)
    read = Counter(u for shards in got.values() for u in shards)
    assert read == Counter(URLS)  # each shard once: none lost, none twice
    assert all(got.values())  # in training every reader has at least one shard


def test_order_is_seeded_by_seed_and_epoch_and_identical_on_every_rank():
    def order(seed: int, epoch: int) -> list[list[str]]:
        got = readers(URLS, world=2, workers=2, train=True, seed=seed, epoch=epoch)
        return [got[k] for k in sorted(got)]

    base = order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) == base  # deterministic
    assert order(seed=2, epoch=0) != base and order(seed=1, epoch=1) != base
    epochs = [order(seed=1, epoch=e) for e in range(6)]
    assert len({str(e) for e in epochs}) == 6  # every epoch its own order
    # The ranks deal from one shuffle (computed independently on each rank): rank r takes
    # every world-th shard of it, so interleaving the ranks' lists restores one permutation.
    r0 = rank_shards(URLS, workers=1, train=True, seed=1, epoch=0, rank=0, world=2)
    r1 = rank_shards(URLS, workers=1, train=True, seed=1, epoch=0, rank=1, world=2)
    merged = [u for pair in zip(r0, r1 + [None]) for u in pair if u is not None]
    assert sorted(merged) == sorted(URLS) and merged != URLS


def test_eval_keeps_file_order_and_tolerates_idle_readers():
    got = readers(URLS[:3], world=2, workers=2, train=False, seed=0, epoch=0)
    assert got[(0, 0)] == ["s-000.tar"] and got[(0, 1)] == ["s-002.tar"]
    assert got[(1, 0)] == ["s-001.tar"] and got[(1, 1)] == []  # an idle reader in eval mode
    for epoch in (0, 1):  # no shuffle, whatever the epoch
        assert rank_shards(URLS, workers=1, train=False, seed=9, epoch=epoch, rank=0, world=1) == URLS


def test_too_few_shards_for_the_readers_is_a_clear_error():
    with pytest.raises(DataError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 loader worker\(s\) = 4 readers"):
        rank_shards(URLS[:3], workers=2, train=True, seed=0, epoch=0, rank=0, world=2)
    with pytest.raises(DataError, match="fewer shards than ranks"):
        rank_shards(URLS[:1], workers=1, train=True, seed=0, epoch=0, rank=0, world=2)


@pytest.mark.parametrize("readers_", [1, 2, 5])
def test_worker_of_rotates_the_round_robin(readers_):
    for first in range(readers_):
        played = [worker_of(slot, first, readers_) for slot in range(readers_)]
        assert played[0] == first and sorted(played) == list(range(readers_))
        assert played == [(first + s) % readers_ for s in range(readers_)]
