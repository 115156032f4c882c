"""Skip counting: every dropped sample counted once by kind, handed over with the next batch."""

from __future__ import annotations

import pytest

from clipkit.data.decode import SampleError
from clipkit.data.skips import DataError, SkipCounter
from clipkit.data.tario import TarDamaged


def test_counts_by_kind_and_take_hands_them_over_once():
    skips = SkipCounter("skip")
    assert not skips and skips.take() == {}
    for kind in ("decode_error", "empty_caption", "decode_error"):
        skips.bad_sample("a.tar", "k", SampleError(kind))
    assert skips
    assert skips.take() == {"decode_error": 2, "empty_caption": 1}
    assert not skips and skips.take() == {}  # taken: the next batch carries none of them


def test_what_a_damaged_shard_lost():
    skips = SkipCounter("skip", sizes={"a.tar": 10})
    skips.bad_shard("a.tar", 4, TarDamaged("truncated"))  # sizes.json: 10 - 4 samples lost
    skips.bad_shard("b.tar", 4, TarDamaged("truncated"))  # no size known: one event
    skips.bad_shard("c.tar", 0, OSError("no such file"))
    skips.bad_shard("a.tar", 12, EOFError())  # more read than sizes.json says: still one
    assert skips.take() == {"corrupt_shard": 6 + 1 + 1, "unreadable_shard": 1}


def test_takes_add_up_to_every_skip():
    skips, total, handed = SkipCounter("skip"), 0, []
    for batch in range(7):
        for i in range(batch % 3):
            skips.bad_sample("a.tar", f"k{batch}-{i}", SampleError("decode_error"))
            total += 1
        handed.append(skips.take())
    assert sum(sum(h.values()) for h in handed) == total == 6


def test_raise_mode_names_the_shard_and_the_sample():
    skips = SkipCounter("raise", sizes={"a.tar": 10})
    with pytest.raises(DataError, match=r"bad sample 'k7' in shard 'a.tar': decode_error: bad bytes") as err:
        skips.bad_sample("a.tar", "k7", SampleError("decode_error", "bad bytes"))
    assert isinstance(err.value.__cause__, SampleError)
    with pytest.raises(DataError, match=r"shard 'a.tar' is damaged after 4 samples of 10"):
        skips.bad_shard("a.tar", 4, TarDamaged("truncated"))
    assert not skips  # nothing counted when raising


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="data.on_error must be 'skip' or 'raise'"):
        SkipCounter("ignore")
