"""Exact-resume state of a loader worker: the position after a batch, and continuing from it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.config import DataConfig
from clipkit.data import ShardWriter, build_loader
from clipkit.data.resume import Cursor, position, restore, usable, worker_position
from clipkit.data.shuffle import ShuffleBuffer, seeded_rng
from clipkit.data.skips import DataError

KEYS = ["worker", "shard", "offset", "batches", "samples", "held", "draining", "rng"]


def sample(shard: int, number: int) -> dict:
    return {"__key__": f"{shard}/{number}", "__pos__": (shard, number)}


def test_position_is_plain_data_with_the_documented_keys():
    cursor = Cursor(worker=1, shard=2, offset=5)
    cursor.count_batch(4)
    cursor.count_batch(3)
    assert (cursor.batches, cursor.samples) == (2, 7)
    plain = position(cursor, None)
    assert list(plain) == KEYS and plain["held"] == [] and plain["rng"] is None
    buffer = ShuffleBuffer(3, seeded_rng(0, "samples"))
    stream = buffer(iter([sample(0, n) for n in range(6)]))
    next(stream)
    pos = position(cursor, buffer)
    assert list(pos) == KEYS and json.loads(json.dumps(pos)) == pos  # a checkpoint entry
    assert len(pos["held"]) == 3 and all(s == 0 for s, _ in pos["held"])


def test_restore_puts_the_cursor_back_and_refetches_only_the_held_samples():
    buffer = ShuffleBuffer(4, seeded_rng(3, "samples"))
    feed = [sample(s, n) for s in range(3) for n in range(5)]
    stream = buffer(iter(feed))
    head = [next(stream) for _ in range(6)]
    cursor = Cursor(worker=0, shard=2, offset=0, batches=3, samples=6)
    pos = json.loads(json.dumps(position(cursor, buffer)))
    asked = []

    def fetch(shard: int, numbers: set[int]) -> dict[int, dict]:
        asked.append((shard, sorted(numbers)))
        return {n: sample(shard, n) for n in numbers}

    again_cursor, again = Cursor(worker=0), ShuffleBuffer(4, seeded_rng("other"))
    restore(pos, again_cursor, again, [f"s{i}.tar" for i in range(3)], fetch)
    assert again_cursor == cursor
    held = sorted(tuple(p) for p in pos["held"])
    assert sorted((s, n) for s, ns in asked for n in ns) == held  # each held sample once, nothing else
    assert len(asked) == len({s for s, _ in held})  # each shard opened once
    rest = list(again(iter(feed[4 + len(head) :])))
    assert [x["__pos__"] for x in head + rest] == [
        x["__pos__"] for x in list(ShuffleBuffer(4, seeded_rng(3, "samples"))(iter(feed)))
    ]


def test_a_held_sample_that_is_gone_is_a_clear_error():
    buffer = ShuffleBuffer(2, seeded_rng(0))
    stream = buffer(iter([sample(0, n) for n in range(4)]))
    next(stream)
    pos = position(Cursor(0, shard=0, offset=3), buffer)
    with pytest.raises(DataError, match=r"sample \d of shard 'a.tar' is gone \(2 samples missing\)"):
        restore(pos, Cursor(0), ShuffleBuffer(2, seeded_rng(0)), ["a.tar"], lambda shard, numbers: {})


def test_usable_and_worker_position():
    resume = {"shards": ["a", "b"], "readers": 2, "next_worker": 1, "positions": [{"worker": 0}, None]}
    assert usable(resume, ["a", "b"], 2, epoch=0) is resume
    assert usable(None, ["a"], 1, epoch=0) is None
    with pytest.warns(UserWarning, match="cannot continue epoch 3 .* 2 shard\\(s\\) with 2 reader"):
        assert usable(resume, ["a", "b"], 1, epoch=3) is None
    with pytest.warns(UserWarning, match="the pass starts over"):
        assert usable(resume, ["b", "a"], 2, epoch=0) is None
    assert worker_position(resume, 0) == {"worker": 0}
    assert worker_position(resume, 1) is None and worker_position(resume, 5) is None
    assert worker_position(None, 0) is None


# ---------------------------------------------------------------------------- through build_loader


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t), sum(t.encode()) % 997] for t in texts])


def transform(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255  # (3, 4, 4)


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    out: Path = tmp_path_factory.mktemp("resume")
    with ShardWriter(out, prefix="r", maxcount=7) as w:  # 4 shards of 7: batches cross shards
        for i in range(28):
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), (i, 2 * i, 3 * i)).save(buf, format="PNG")
            w.write({"__key__": f"k{i:03d}", "png": buf.getvalue(), "txt": f"caption {i}"})
    return str(out / "r-{000000..000003}.tar")


@pytest.mark.parametrize("shuffle", [0, 5])
def test_every_position_of_a_pass_continues_with_the_same_batches(spec, shuffle):
    cfg = DataConfig(batch_size=3, workers=0, shuffle_buffer=shuffle)

    def loader(resume=None):
        return build_loader(cfg, spec, transform, tokenize, train=True, seed=4, epoch=1, resume=resume)

    first = loader()
    whole = list(first)
    assert len(whole) == 9 and all("stream" in b for b in whole)
    for k, batch in enumerate(whole):
        resume = {"shards": first.shards, "readers": 1, "next_worker": 0, "positions": [batch["stream"]]}
        again = loader(resume)
        assert again.resumed
        rest = list(again)
        assert [b["key"] for b in rest] == [b["key"] for b in whole[k + 1 :]], k
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, whole[k + 1 :]))
