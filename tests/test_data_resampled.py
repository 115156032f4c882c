"""data.resampled: shards drawn with replacement per (rank, worker), without end; no shard minimum;
seeded draws; exact resume of the endless stream; and one training run resumed bit-identically."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from training_helpers import tiny_tree, write_shards

from clipkit.config import Config, ConfigError, DataConfig, from_dict, load_config
from clipkit.data import ShardWriter, build_loader
from clipkit.data.pipeline import _open
from clipkit.data.reader import ShardReader
from clipkit.data.resample import resampled_mix
from clipkit.data.resume import Cursor, usable
from clipkit.data.skips import DataError, SkipCounter
from clipkit.errors import ClipkitError
from clipkit.training import checkpoint as ckpt
from clipkit.training.safety import preflight_shards
from clipkit.training.stream import TrainStream


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t), sum(t.encode()) % 997] for t in texts])


def transform(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255  # (3, 8, 8)


def png_shards(folder: Path, prefix: str, n: int, per_shard: int, size: int = 8) -> str:
    """``n`` samples of ``size`` px noise PNGs in shards of ``per_shard``; returns the folder."""
    with ShardWriter(folder, prefix=prefix, maxcount=per_shard) as w:
        for i in range(n):
            buf = io.BytesIO()
            pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="PNG")
            w.write({"__key__": f"{prefix}{i:03d}", "png": buf.getvalue(), "txt": f"caption {prefix} {i}"})
    return str(folder)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> str:
    return png_shards(tmp_path_factory.mktemp("one"), "o", 7, 7)


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory) -> str:
    return png_shards(tmp_path_factory.mktemp("eight"), "e", 24, 3)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"batch_size": 3, "workers": 0, "shuffle_buffer": 0, "resampled": True, **kw})


# ---------------------------------------------------------------------------- no minimum


def test_one_shard_feeds_two_ranks_of_two_workers(one_shard):
    keys = {f"o{i:03d}" for i in range(7)}
    for rank in (0, 1):
        loader = build_loader(
            cfg(workers=2, shuffle_buffer=4), one_shard, transform, tokenize, train=True, seed=0,
            rank=rank, world_size=2,
        )  # fmt: skip
        assert loader.readers == 2 and loader.resampled
        batches = list(itertools.islice(loader, 8))  # more samples than the shard holds: endless
        assert all(len(b["key"]) == 3 and set(b["key"]) <= keys for b in batches)
        assert {b["stream"]["worker"] for b in batches} == {0, 1}  # both workers read the one shard
        assert all(b["source"] == [0, 0, 0] for b in batches)
    with pytest.raises(
        DataError, match=r"1 shard\(s\) for 2 rank\(s\) x 2 loader worker\(s\).*data.resampled"
    ):
        build_loader(
            cfg(workers=2, resampled=False), one_shard, transform, tokenize, train=True, seed=0, world_size=2
        )


def test_preflight_has_no_shard_minimum_when_resampled(one_shard):
    preflight_shards(cfg(train=one_shard, workers=4), world=2)  # 8 readers, 1 shard: fine
    with pytest.raises(ClipkitError, match=r"1 training shard\(s\) for 2 rank.*data.resampled=true"):
        preflight_shards(cfg(train=one_shard, workers=4, resampled=False), world=2)


# ---------------------------------------------------------------------------- seeded draws


def shard_draws(spec: str, n: int, *, seed: int, rank: int, worker: int) -> list[int]:
    """The shards (index in the spec's list) of the first ``n`` draws of one (rank, worker)."""
    skips = SkipCounter("raise")

    def reader_of(shards: list[str], cursor: Cursor) -> ShardReader:
        return ShardReader(shards, {"png", "txt"}.__contains__, skips, cursor, opener=_open)

    mix = resampled_mix([sorted(str(p) for p in Path(spec).glob("*.tar"))], [], reader_of, Cursor(worker),
                        seed=seed, rank=rank, shuffle_buffer=0, batch_size=3)  # fmt: skip
    draws: dict[int, int] = {}
    for sample in mix:
        draws.setdefault(sample["__draw__"][-1], sample["__pos__"][0])
        if len(draws) > n:
            return [draws[d] for d in range(n)]
    raise AssertionError("unreachable: the stream is endless")


def test_draws_are_seeded_by_seed_rank_and_worker_and_come_with_replacement(eight_shards):
    base = shard_draws(eight_shards, 40, seed=5, rank=0, worker=0)
    assert base == shard_draws(eight_shards, 40, seed=5, rank=0, worker=0)  # same seed: same draws
    assert base != shard_draws(eight_shards, 40, seed=5, rank=1, worker=0)
    assert base != shard_draws(eight_shards, 40, seed=5, rank=0, worker=1)
    assert base != shard_draws(eight_shards, 40, seed=6, rank=0, worker=0)
    assert set(base) == set(range(8))  # every shard is drawn in the long run
    # With replacement: some shard comes again before all 8 have been seen.
    first_full = next(i for i in range(len(base)) if set(base[: i + 1]) == set(range(8)))
    assert len(base[: first_full + 1]) > 8 and max(Counter(base[: first_full + 1]).values()) > 1


def test_repeats_of_a_sample_get_new_random_crops(tmp_path):
    # 64 px images: on the 8 px ones two draws picked the same crop box in about 1 pair of 140
    # (the crop seed hashes the shard's path, which differs from run to run).
    shard = png_shards(tmp_path, "o", 7, 7, size=64)
    crop = T.Compose([T.RandomResizedCrop(3, scale=(0.2, 1.0)), T.ToTensor()])
    loader = build_loader(cfg(batch_size=7), shard, crop, tokenize, train=True, seed=0)
    by_key: dict[str, list[torch.Tensor]] = {}
    for batch in itertools.islice(loader, 6):
        for key, image in zip(batch["key"], batch["image"]):
            by_key.setdefault(key, []).append(image)
    repeats = [images for images in by_key.values() if len(images) > 1]
    assert repeats and all(not torch.equal(images[0], images[1]) for images in repeats)


# ---------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_state_continues_the_endless_stream_exactly(tmp_path, workers):
    # Source a: 1 shard of 5 with a buffer of 8 (the buffer holds the same sample from several
    # draws); source b: 3 shards of 4. Random crops, seeded per sample and draw.
    spec = png_shards(tmp_path / "a", "a", 5, 5) + "::" + png_shards(tmp_path / "b", "b", 12, 4)
    data = cfg(workers=workers, shuffle_buffer=8, train_weights=[1, 2])
    crop = T.Compose([T.RandomResizedCrop(3, scale=(0.3, 1.0)), T.ToTensor()])

    def stream() -> TrainStream:
        def make(seed: int, epoch: int, resume: dict | None):
            return build_loader(data, spec, crop, tokenize, train=True, seed=seed, epoch=epoch, resume=resume)

        return TrainStream(make, data.batch_size, seed=1)

    total = 24
    whole = stream()
    want = [whole.next_batch() for _ in range(total)]
    assert whole.epoch == 0 and whole.dropped == 0  # one endless pass
    for cut in (1, 6, 15):
        first = stream()
        for i in range(cut):
            first.next_batch()
        state = first.state_dict()
        assert all(p is None or p["resampled"] for p in state["positions"])
        again = stream()
        again.load_state_dict(state)
        for i in range(cut, total):
            got, ref = again.next_batch(), want[i]
            assert got["key"] == ref["key"] and got["source"] == ref["source"], (cut, i)
            assert torch.equal(got["image"], ref["image"]) and torch.equal(got["text"], ref["text"])


def test_positions_of_another_kind_start_the_stream_over(one_shard):
    loader = build_loader(cfg(), one_shard, transform, tokenize, train=True, seed=0)
    pos = next(iter(loader))["stream"]
    resume = {"shards": loader.shards, "readers": 1, "next_worker": 0, "positions": [pos]}
    assert usable(resume, loader.shards, 1, 0, resampled=True) is resume
    with pytest.warns(UserWarning, match="resampled, now 1 with 1 .*data.resampled changed"):
        assert usable(resume, loader.shards, 1, 0, resampled=False) is None


def test_a_source_that_gives_nothing_is_an_error_not_a_hang(tmp_path):
    spec = png_shards(tmp_path / "s", "s", 4, 4)
    loader = build_loader(cfg(image_keys="jpg"), spec, transform, tokenize, train=True, seed=0)
    with pytest.raises(DataError, match=r"training samples in a row were unusable .*data.image_keys"):
        next(iter(loader))


def test_a_source_of_broken_shards_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    loader = build_loader(
        cfg(on_error="skip"), str(tmp_path / "bad.tar"), transform, tokenize, train=True, seed=0
    )
    with pytest.raises(DataError, match=r"source 0 \(1 shard\(s\).*the last 24 shards drawn gave no sample"):
        next(iter(loader))


# ---------------------------------------------------------------------------- config


def test_hard_negatives_are_refused_with_resampling():
    with pytest.raises(ConfigError, match=r"data.hard_negatives.k > 0 .*data.resampled=true"):
        load_config(None, ["data.resampled=true", "data.hard_negatives.k=2"])


# ---------------------------------------------------------------------------- through the loop


def test_training_resumed_from_a_mid_run_checkpoint_is_bit_identical(tmp_path):
    """A resampled run resumed from its own step-6 checkpoint ends with the uninterrupted run's weights."""
    from clipkit.training.loop import train

    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=20, idx=True)
    tree = tiny_tree(
        shards, tmp_path, **{"data.resampled": True, "data.workers": 2, "train.samples": 96,
                             "train.checkpoint_every": 3, "train.keep_last": 5, "train.deterministic": True},
    )  # fmt: skip
    whole = train(from_dict(Config, tree))  # 12 steps of 8 from 1 shard with 2 workers
    middle = ckpt.checkpoint_path(whole, 6)
    assert middle.is_file()
    resumed = train(from_dict(Config, {**tree, "train": {**tree["train"], "run_name": "resumed",
                                                          "resume": str(middle)}}))  # fmt: skip
    want, got = ckpt.load(ckpt.latest(whole)), ckpt.load(ckpt.latest(resumed))
    assert want["step"] == got["step"] == 12 and got["epoch"] == 0
    for key in want["model"]:
        assert torch.equal(want["model"][key], got["model"][key]), key
