"""Sample4Geo hard-negative batches: the idx index, kNN, greedy composition, and a training run."""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from training_helpers import WORDS, png_bytes, tiny_tree

from clipkit.config import Config, ConfigError, from_dict, load_config
from clipkit.data.hard_negatives import (
    HardNegativeSampler,
    compose_batches,
    index_shards,
    nearest_neighbours,
    read_samples,
)
from clipkit.data.pipeline import DataError
from clipkit.data.urls import expand_urls
from clipkit.training import loop


def write_idx_shards(folder: Path, n_shards: int = 4, per_shard: int = 8, seed: int = 0) -> tuple[str, dict]:
    """Shards of png + txt + a unique idx (shuffled, so idx is not the reading order); returns
    (brace spec, {idx: (key, caption)})."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    ids = list(range(100, 100 + n_shards * per_shard))
    rng.shuffle(ids)
    truth = {}
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"train-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                idx = ids[s * per_shard + i]
                key, caption = f"s{s:03d}_{i:04d}", " ".join(rng.choice(WORDS) for _ in range(3))
                sink.write({"__key__": key, "png": png_bytes(rng), "txt": caption, "idx": str(idx)})
                truth[idx] = (key, caption)
    return str(folder / f"train-{{000000..{n_shards - 1:06d}}}.tar"), truth


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- idx -> (shard, offset)


def test_index_finds_every_sample_by_idx(tmp_path):
    spec, truth = write_idx_shards(tmp_path)
    index = index_shards(expand_urls(spec))
    assert sorted(index.where) == sorted(truth) and len(index) == 32
    ids = random.Random(1).sample(
        sorted(truth), len(truth)
    )  # all, in random order (first and last of shards too)
    got = read_samples(index, ids, lambda ext: ext in ("txt", "idx"))
    for i in ids:
        assert got[i]["__key__"] == truth[i][0]
        assert got[i]["txt"].decode() == truth[i][1] and int(got[i]["idx"]) == i
        assert "png" not in got[i]  # members not wanted are not read


def test_index_refuses_what_it_cannot_serve(tmp_path):
    plain = tmp_path / "plain.tar"
    with wds.TarWriter(str(plain)) as sink:
        sink.write({"__key__": "a", "txt": "x"})
    with pytest.raises(DataError, match="no idx member"):
        index_shards([str(plain)])
    dup = tmp_path / "dup.tar"
    with wds.TarWriter(str(dup)) as sink:
        sink.write({"__key__": "a", "txt": "x", "idx": "3"})
        sink.write({"__key__": "b", "txt": "y", "idx": "3"})
    with pytest.raises(DataError, match="idx 3 appears twice"):
        index_shards([str(dup)])
    zipped = tmp_path / "z.tar.gz"
    zipped.write_bytes(gzip.compress(dup.read_bytes()))
    with pytest.raises(DataError, match="gzipped"):
        index_shards([str(zipped)])
    with pytest.raises(DataError, match="not a local shard"):
        index_shards(["https://example.org/a.tar"])


# ----------------------------------------------------------------------------- kNN, composition


def test_nearest_neighbours_equal_brute_force():
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((40, 6)), rng.standard_normal((40, 6))
    got = nearest_neighbours(img, txt, 5)
    sim = img @ txt.T
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(img, txt, 40)


def test_neighbours_leave_out_texts_equal_to_the_own_caption():
    # Rows 0-3 are two views of two captions (0 and 1 share a caption, 2 and 3 another): the
    # twin's text is nearest to each image, but it is a positive, never a hard negative.
    rng = np.random.default_rng(1)
    img, txt = rng.standard_normal((30, 6)), rng.standard_normal((30, 6))
    txt[1], txt[3] = txt[0], txt[2]
    img[:4] = txt[:4] * 10
    got = nearest_neighbours(img, txt, 4)
    same = {0: {0, 1}, 1: {0, 1}, 2: {2, 3}, 3: {2, 3}}
    sim = img @ txt.T
    for i in range(30):
        excluded = same.get(i, {i})
        want = [j for j in np.argsort(-sim[i], kind="stable") if j not in excluded][:4]
        assert not excluded & set(got[i].tolist()), i
        np.testing.assert_allclose(sim[i, got[i]], sim[i, want], rtol=1e-5)  # ties (2, 3) in any order
    with pytest.raises(ValueError, match="share one caption"):
        nearest_neighbours(img, txt, 29)


def test_compose_puts_clusters_together_and_every_sample_once():
    # 6 clusters of 4: each sample's 3 neighbours are its cluster mates -> batches = clusters.
    cluster = np.arange(24) // 4
    neighbours = np.array([[j for j in range(24) if cluster[j] == cluster[i] and j != i] for i in range(24)])
    batches = compose_batches(neighbours, 4, np.random.default_rng(0))
    assert sorted(sorted(cluster[b].tolist()) for b in batches) == [[c] * 4 for c in range(6)]
    assert sorted(np.concatenate(batches).tolist()) == list(range(24))


def test_compose_with_any_neighbours_uses_each_sample_at_most_once():
    rng = np.random.default_rng(1)
    neighbours = rng.integers(0, 30, (30, 5))
    batches = compose_batches(neighbours, 8, np.random.default_rng(2))
    flat = np.concatenate(batches).tolist()
    assert len(batches) == 3 and all(len(b) == 8 for b in batches) and len(set(flat)) == 24


def test_config_keys():
    cfg = load_config(None, ["data.hard_negatives.k=3", "data.hard_negatives.every_samples=64"])
    assert cfg.data.hard_negatives.k == 3 and cfg.data.hard_negatives.every_samples == 64
    with pytest.raises(ConfigError, match="did you mean 'data.hard_negatives.every_samples'"):
        load_config(None, ["data.hard_negatives.every_sample=3"])


# ----------------------------------------------------------------------------- in a training run


def test_training_run_batches_neighbours_together(tmp_path, monkeypatch):
    spec, truth = write_idx_shards(tmp_path / "shards")
    # 32 samples, batches of 8: 4 per pass; 96 samples = pass 0 (ordinary) + 2 mined passes.
    tree = tiny_tree(spec, tmp_path / "runs", **{"train.samples": 96, "data.hard_negatives.k": 3})
    cfg = from_dict(Config, tree)
    seen = []
    step = loop.train_step

    def recording_step(run, micro, *args, **kw):
        sampler = run.stream.make_loader
        nbrs = None
        if sampler.neighbours is not None:
            ids = sampler.ids
            nbrs = {int(ids[p]): [int(ids[q]) for q in sampler.neighbours[p]] for p in range(len(ids))}
        seen.extend((run.stream.epoch, sampler.minings, b["idx"].tolist(), nbrs) for b in micro)
        assert run.stream.open_ahead is False  # a pass is mined with the model at its start
        return step(run, micro, *args, **kw)

    monkeypatch.setattr(loop, "train_step", recording_step)
    loop.train(cfg)
    assert [e for e, *_ in seen] == [0] * 4 + [1] * 4 + [2] * 4
    assert [m for _, m, *_ in seen] == [0] * 4 + [1] * 4 + [2] * 4  # mined at each pass boundary
    for epoch in (1, 2):
        batches = [(b, nbrs) for e, _, b, nbrs in seen if e == epoch]
        flat = [i for b, _ in batches for i in b]
        assert sorted(flat) == sorted(truth)  # every sample exactly once in the pass
        before: set[int] = set()
        for b, nbrs in batches:
            # The batch opener's neighbours not yet used in this pass follow it, best first.
            follow = [q for q in nbrs[b[0]] if q not in before][:7]
            assert b[1 : 1 + len(follow)] == follow
            before |= set(b)


@pytest.mark.parametrize("early", [True, False])
def test_data_open_next_pass_early_reaches_the_training_stream(tmp_path, monkeypatch, early):
    spec, _ = write_idx_shards(tmp_path / "shards")
    tree = tiny_tree(spec, tmp_path / "runs", **{"train.samples": 16, "data.open_next_pass_early": early})
    flags = []
    step = loop.train_step

    def recording_step(run, micro, *args, **kw):
        flags.append(run.stream.open_ahead)
        return step(run, micro, *args, **kw)

    monkeypatch.setattr(loop, "train_step", recording_step)
    loop.train(from_dict(Config, tree))
    assert flags == [early, early]


class FakeModel:
    def image_transform(self, train: bool):
        return lambda img: torch.zeros(3, 4, 4)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.zeros(len(texts), 2, dtype=torch.long)


def test_ranks_take_their_rows_of_every_global_batch(tmp_path):
    spec, truth = write_idx_shards(tmp_path)
    cfg = from_dict(
        Config, {"data": {"train": spec, "batch_size": 4, "hard_negatives": {"k": 2, "every_samples": 10**6}}}
    ).data
    ids = np.array(sorted(truth))
    neighbours = nearest_neighbours(*np.random.default_rng(0).standard_normal((2, 32, 5)), 2)
    per_rank = []
    for rank in range(2):
        acc = SimpleNamespace(num_processes=2, process_index=rank, device="cpu")
        sampler = HardNegativeSampler(cfg, FakeModel(), acc, None, fallback=None)
        sampler.ids, sampler.neighbours = ids, neighbours  # as if mined: no mining at epoch 1
        per_rank.append([b["idx"].tolist() for b in sampler(123, 1, None)])
    plan = compose_batches(neighbours, 8, np.random.default_rng(123))
    assert [a + b for a, b in zip(*per_rank)] == [ids[p].tolist() for p in plan]
    assert len(plan) == 4 and sampler.minings == 0 and sampler.left_out == 0
