"""ShardReader: raw samples from a cursor on, the cursor kept at the next sample, damage counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipkit.data import ShardWriter
from clipkit.data.reader import ShardReader
from clipkit.data.resume import Cursor
from clipkit.data.skips import SkipCounter
from clipkit.data.urls import open_url


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    out: Path = tmp_path_factory.mktemp("reader")
    with ShardWriter(out, prefix="r", maxcount=4) as w:
        for i in range(12):
            w.write({"__key__": f"k{i:02d}", "txt": f"caption {i}", "png": b"x"})
    return [str(out / f"r-{s:06d}.tar") for s in range(3)]


def read(shards: list[str], cursor: Cursor, skips: SkipCounter | None = None, **kw) -> list[dict]:
    reader = ShardReader(
        shards,
        {"txt"}.__contains__,
        SkipCounter("skip") if skips is None else skips,
        cursor,
        opener=open_url,
        **kw,
    )
    return list(reader)


def test_reads_in_order_with_positions_and_only_wanted_members(shards):
    cursor = Cursor(worker=0)
    got = read(shards, cursor)
    assert [s["__key__"] for s in got] == [f"k{i:02d}" for i in range(12)]
    assert [s["__pos__"] for s in got] == [(s, n) for s in range(3) for n in range(4)]
    assert set(got[0]) == {"__key__", "txt", "__url__", "__pos__"}  # png not read
    assert (cursor.shard, cursor.offset) == (3, 0)  # past the last shard


@pytest.mark.parametrize("stop", [1, 4, 6, 11])
def test_a_cursor_taken_mid_pass_continues_with_the_next_sample(shards, stop):
    cursor = Cursor(worker=1)
    reader = iter(ShardReader(shards, {"txt"}.__contains__, SkipCounter("skip"), cursor, opener=open_url))
    head = [next(reader)["__key__"] for _ in range(stop)]
    again = Cursor(worker=1, shard=cursor.shard, offset=cursor.offset)
    opened = []

    def opener(url: str):
        opened.append(url)
        return open_url(url)

    rest = [
        s["__key__"]
        for s in ShardReader(shards, {"txt"}.__contains__, SkipCounter("skip"), again, opener=opener)
    ]
    assert head + rest == [f"k{i:02d}" for i in range(12)]
    assert opened[0] == shards[(stop - 1) // 4]  # shards before the cursor are not opened


def test_progress_and_fetch(shards):
    progress = [0] * 4
    seen = []  # worker 1's (shard index, samples read of it) as each sample comes out
    reader = ShardReader(
        shards,
        {"txt"}.__contains__,
        SkipCounter("skip"),
        Cursor(worker=1),
        opener=open_url,
        progress=progress,
    )
    for _ in reader:
        seen.append(tuple(progress[2:]))
    assert seen == [(s, n) for s in range(3) for n in range(1, 5)]
    assert progress[2:] == [3, 4]  # all 3 shards read: the index is past the last one
    reader = ShardReader(shards, {"txt"}.__contains__, SkipCounter("skip"), Cursor(0), opener=open_url)
    found = reader.fetch(1, {0, 3, 9})
    assert sorted(found) == [0, 3] and found[3]["__key__"] == "k07" and found[3]["__pos__"] == (1, 3)


def test_a_damaged_shard_is_counted_and_reading_goes_on(shards, tmp_path):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(shards[0]).read_bytes()[: 3072 + 512 + 4])  # cut inside k01.txt's data
    skips = SkipCounter("skip")
    got = read([str(broken), shards[1]], Cursor(0), skips)
    assert [s["__key__"] for s in got] == ["k04", "k05", "k06", "k07"]  # the next shard is read whole
    assert skips.take() == {"corrupt_shard": 1}
