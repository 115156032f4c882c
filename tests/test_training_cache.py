"""Locked-tower feature cache: equals the tower run directly, invalidated by new weights, incremental."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import write_shards

from clipkit.config import Config, DataConfig, ModelConfig, TowerConfig, from_dict
from clipkit.data import build_loader
from clipkit.models import build_model
from clipkit.training import feature_cache as fc

DATA = DataConfig(batch_size=8, workers=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=TowerConfig(name="open_clip:clipkit-tiny-ViT", locked=True, image_size=32),
        text=TowerConfig(name="open_clip:clipkit-tiny-ViT", context_length=16),
        embed_dim=16,
    )
    return build_model(cfg)


@pytest.fixture(autouse=True)
def eager_fill(monkeypatch):
    """CountingTower counts the images of each Python call of the tower; the fill's frozen graph
    (``clipkit.models.inference.graph_mode``) would call it twice when tracing, then never."""
    monkeypatch.setenv("CLIPKIT_GRAPH_MODE", "0")


class CountingTower:
    """Wraps ``model.tower_features`` to count the images it is given."""

    def __init__(self, model, monkeypatch):
        self.n = 0
        inner = model.tower_features

        def counted(images):
            self.n += images.shape[0]
            return inner(images)

        monkeypatch.setattr(model, "tower_features", counted)


def direct_features(model, shard_files: list[Path]) -> dict[str, np.ndarray]:
    """Oracle: decode every PNG with PIL and run the tower one image at a time."""
    transform = model.image_transform(train=False)
    out = {}
    model.eval()
    for shard in shard_files:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    with torch.no_grad():
                        feat = model.vision(transform(img)[None])[0]  # the tower itself
                    out[member.name.split(".")[0]] = feat.numpy()
    return out


def test_cache_equals_tower_and_is_reused(tmp_path, model, monkeypatch):
    spec = write_shards(tmp_path / "shards", n_shards=2, per_shard=20)
    counter = CountingTower(model, monkeypatch)
    cache, report = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False)
    assert counter.n == 40 and "40 computed now" in report
    folder = tmp_path / "shards" / fc.CACHE_DIRNAME / model.vision.fingerprint()
    assert cache.folder == folder and (folder / "features-000000.npy").is_file()
    assert [p["dtype"] for p in json.loads((folder / "keys.json").read_text())["parts"]] == ["float16"]
    expected = direct_features(model, sorted((tmp_path / "shards").glob("*.tar")))
    assert set(cache.keys) == set(expected)
    for key, feat in expected.items():
        got = cache.get(key)
        assert got.dtype == np.float32 and got.shape == feat.shape
        np.testing.assert_allclose(got, feat, rtol=2e-3, atol=2e-3)  # fp16 storage
    # Second start: nothing computed, the same rows served.
    cache2, report2 = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False)
    assert counter.n == 40 and "nothing to compute" in report2
    np.testing.assert_array_equal(cache2.get(cache.keys[7]), cache.get(cache.keys[7]))


def test_new_shard_computes_only_its_keys(tmp_path, model, monkeypatch):
    folder = tmp_path / "shards"
    write_shards(folder, n_shards=2, per_shard=10)
    first, _ = fc.build_feature_cache(model, DATA, str(folder), tmp_path / "run", progress=False)
    old = {k: first.get(k) for k in first.keys}
    write_shards(folder, n_shards=1, per_shard=10, seed=5, start=2)  # train-000002.tar
    counter = CountingTower(model, monkeypatch)
    cache, report = fc.build_feature_cache(model, DATA, str(folder), tmp_path / "run", progress=False)
    assert counter.n == 10 and "10 computed now" in report and "20 reused" in report
    assert len(cache) == 30 and all(k in cache for k in old)
    for k, v in old.items():
        np.testing.assert_array_equal(cache.get(k), v)
    expected = direct_features(model, [folder / "train-000002.tar"])
    for key, feat in expected.items():
        np.testing.assert_allclose(cache.get(key), feat, rtol=2e-3, atol=2e-3)


def test_interrupted_build_keeps_saved_parts(tmp_path, model, monkeypatch):
    spec = write_shards(tmp_path / "shards", n_shards=3, per_shard=8)
    monkeypatch.setattr(fc, "FLUSH_ROWS", 10)  # groups: shards 0+1 (16 rows), then shard 2
    inner = fc._compute
    calls = []

    def dies_on_second_group(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-build")
        return inner(*args, **kw)

    monkeypatch.setattr(fc, "_compute", dies_on_second_group)
    with pytest.raises(KeyboardInterrupt):
        fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False)
    monkeypatch.setattr(fc, "_compute", inner)
    counter = CountingTower(model, monkeypatch)
    cache, report = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False)
    assert counter.n == 8 and "8 computed now" in report and "16 reused" in report
    assert [p["rows"] for p in cache.parts] == [16, 8] and len(cache) == 24
    expected = direct_features(model, sorted((tmp_path / "shards").glob("*.tar")))
    for key, feat in expected.items():
        np.testing.assert_allclose(cache.get(key), feat, rtol=2e-3, atol=2e-3)


def test_changed_weights_get_a_new_cache(tmp_path, model):
    spec = write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    first, _ = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False)
    key = first.keys[0]
    before = first.get(key)
    param = [p for p in model.vision.parameters() if p.ndim == 2][-1]
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(torch.randn_like(param))  # random: a constant shift can cancel in a LayerNorm
    try:
        second, report = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False)
        assert second.folder != first.folder and "8 computed now" in report
        assert not np.allclose(second.get(key), before, atol=1e-2)
        assert (first.folder / "keys.json").is_file()  # the old tower's cache stays valid for it
    finally:
        with torch.no_grad():
            param.copy_(saved)


def test_read_only_shard_folder_falls_back_to_run_dir(tmp_path, model, monkeypatch):
    spec = write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    shard_dir = tmp_path / "shards"
    real = fc._writable
    monkeypatch.setattr(
        fc, "_writable", lambda folder: not str(folder).startswith(str(shard_dir)) and real(folder)
    )
    cache, report = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False)
    assert cache.folder == tmp_path / "run" / "feature_cache" / model.vision.fingerprint()
    assert "read-only" in report and len(cache) == 8
    assert not (shard_dir / fc.CACHE_DIRNAME).exists()


def test_loader_serves_cached_features_and_cache_pickles_small(tmp_path, model):
    spec = write_shards(tmp_path / "shards", n_shards=2, per_shard=8)
    cache, _ = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False)
    blob = pickle.dumps(cache)
    assert len(blob) < 4000  # keys and folder only: workers map the file themselves
    clone = pickle.loads(blob)
    loader = build_loader(DATA, spec, None, model.tokenize, train=False, seed=0, feature_lookup=clone)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 16
    for b in batches:
        assert "image" not in b and b["image_features"].shape == (len(b["key"]), model.vision.out_dim)
        for row, key in zip(b["image_features"], b["key"]):
            np.testing.assert_array_equal(row.numpy(), cache.get(key))


def test_duplicate_keys_across_shards_are_refused(tmp_path, model):
    folder = tmp_path / "shards"
    write_shards(folder, n_shards=1, per_shard=4)
    (folder / "train-000001.tar").write_bytes((folder / "train-000000.tar").read_bytes())
    with pytest.raises(Exception, match="unique across shards"):
        fc.build_feature_cache(model, DATA, str(folder), tmp_path / "run", progress=False)


def test_when_the_cache_applies(model):
    def cfg(**kw):
        tree = {"model": {"vision": {"locked": True}}, "train": {}}
        for dotted, v in kw.items():
            section, key = dotted.split("__")
            tree[section][key] = v
        return from_dict(Config, tree)

    assert fc.why_not_cached(cfg(), model) is None
    assert "feature_cache=false" in fc.why_not_cached(cfg(train__feature_cache=False), model)
    assert "unlocked_layers=1" in fc.why_not_cached(
        from_dict(Config, {"model": {"vision": {"locked": True, "unlocked_layers": 1}}}), model
    )
    assert "locked=false" in fc.why_not_cached(from_dict(Config, {}), model)


def test_outputs_beyond_fp16_range_are_stored_as_float32(tmp_path, model, monkeypatch):
    spec = write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    inner = model.tower_features
    monkeypatch.setattr(model, "tower_features", lambda images: inner(images) * 1e6)
    cache, _ = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False)
    assert [p["dtype"] for p in cache.parts] == ["float32"]
    expected = direct_features(model, [tmp_path / "shards" / "train-000000.tar"])
    for key, feat in expected.items():
        np.testing.assert_allclose(cache.get(key), feat * 1e6, rtol=1e-4)
        assert np.isfinite(cache.get(key)).all()


def test_training_builds_the_cache_at_the_configured_precision_and_runs_at_lr_zero(tmp_path, monkeypatch):
    """``train.feature_cache_precision`` reaches the cache the trainer builds (a cache of its own);
    a run at ``optim.lr=0`` logs its rows (the lr column is the schedule's factor times 0)."""
    from training_helpers import tiny_tree

    from clipkit.training import loop

    seen = []
    real = loop.build_feature_cache

    def spy(*args, **kw):
        seen.append(kw.get("precision"))
        return real(*args, **kw)

    monkeypatch.setattr(loop, "build_feature_cache", spy)
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=16)
    tree = tiny_tree(
        shards, tmp_path / "runs", **{"train.samples": 32, "train.log_every": 1, "optim.lr": 0.0}
    )
    tree["train"]["feature_cache_precision"] = "bf16"
    run = loop.train(from_dict(Config, tree))
    assert seen == ["bf16"]
    caches = [p.name for p in (tmp_path / "shards" / "_clipkit_cache").iterdir()]
    assert len(caches) == 1 and caches[0].endswith("-bf16"), caches
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 3 and "lr" in rows[0].split(",")
