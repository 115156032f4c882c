"""Filling the feature cache in lanes: the same numbers as the one-lane fill and a direct pass.

Oracles: ``job.encode`` run once over every decoded image in one batch (under the same
channels-last layout the fill uses), the one-lane fill at ``BUILD_BATCH``, and the fill as it
was before lanes (``old_fill`` in benchmarks/cache_fill.py). Covered: the pooled tower features (a ViT and the demo's EfficientNet-Lite0,
whose oneDNN kernels depend on the batch size), K augmented views, and the partial cache's
activations below a cut. The stored cache is the float16 of those float32 rows, bit for bit.
"""

from __future__ import annotations

import importlib.util
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm
from training_helpers import write_shards

from clipkit.config import AugmentConfig, DataConfig, ModelConfig, TowerConfig
from clipkit.models import build_model
from clipkit.models.inference import bulk_inference, cpu_lanes, graph_mode, in_lanes
from clipkit.training import feature_cache as fc
from clipkit.training import partial_cache as pc

VIT = TowerConfig(name="open_clip:clipkit-tiny-ViT", image_size=32)
EFFNET = TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled", image_size=64)
AUGMENT = AugmentConfig(scale=[0.3, 1.0], hflip=0.5, brightness=0.4, grayscale=0.3)
# kind -> (vision tower, views, unlocked layers (> 0: the partial cache's activations), loader workers)
KINDS = {
    "vit": (VIT, 1, 0, 0),
    "effnet-workers": (EFFNET, 1, 0, 2),
    "vit-views": (TowerConfig(**{**VIT.__dict__, "augment": True, "augmentation": AUGMENT}), 3, 0, 0),
    "effnet-partial": (EFFNET, 1, 1, 0),
}
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
GRAPH_TOL = 5e-5  # a frozen graph's rows against the eager pass's (see graph_mode)
N_SHARDS, PER_SHARD = 2, 23  # 46 images: 2-3 batches of 16 rows, one of them a longer last batch


def old_fill(*args):
    """``benchmarks/cache_fill.py``'s copy of the fill before lanes."""
    spec = importlib.util.spec_from_file_location("bench_cache_fill", BENCH / "cache_fill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.old_fill(*args)


def model_for(vision: TowerConfig, unlocked: int):
    torch.manual_seed(0)
    vision = TowerConfig(**{**vision.__dict__, "locked": True, "unlocked_layers": unlocked})
    text = TowerConfig(name="open_clip:clipkit-tiny-ViT", context_length=16)
    return build_model(ModelConfig(vision=vision, text=text, embed_dim=16))


def job_for(model, views: int, unlocked: int) -> fc.CacheJob:
    """The job ``build_feature_cache`` (or, with ``unlocked``, ``build_partial_cache``) runs."""
    if unlocked:
        split = model.vision.split_at(unlocked)
        base = pc.partial_fingerprint(model.vision, split)
        return fc.CacheJob(
            model, split.bottom, fc.cache_fingerprint(model.vision, "fp32", views, base), views
        )
    return fc.CacheJob(model, model.tower_features, fc.cache_fingerprint(model.vision, "fp32", views), views)


def direct(job: fc.CacheJob, folder: Path) -> dict[str, np.ndarray]:
    """Oracle: every PNG decoded with PIL, the job's transform, then one ``encode`` of them all."""
    transform = job.transform()
    keys, images = [], []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    key = member.name.split(".")[0]
                    img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    keys.append(key)
                    images.append(transform(img, key) if job.views > 1 else transform(img))
    stacked = torch.stack(images)  # (N, 3, H, W) or (N, views, 3, H, W)
    job.model.eval()
    with torch.inference_mode(), bulk_inference(job.model.vision) as prep:
        out = job.encode(prep(stacked.reshape(-1, *stacked.shape[-3:]))).numpy()
    out = out.reshape(len(keys), job.views, *out.shape[1:]) if job.views > 1 else out
    return dict(zip(keys, out))


def fill(
    job: fc.CacheJob, data: DataConfig, folder: Path, lanes: int, rows: int | None = None
) -> dict[str, np.ndarray]:
    shards = sorted(folder.glob("*.tar"))
    wanted = {k for keys in fc.scan_keys(shards).values() for k in keys}
    with tqdm(disable=True) as bar:
        return fc._compute(job, data, shards, wanted, torch.device("cpu"), bar, lanes=lanes, rows=rows)


@pytest.mark.parametrize("kind", list(KINDS))
def test_lanes_fill_equals_the_one_lane_fill_and_a_direct_pass(kind, tmp_path, monkeypatch):
    vision, views, unlocked, workers = KINDS[kind]
    monkeypatch.setattr(fc, "LANE_ROWS", 16)  # several batches from 46 images
    # The eager pass, as the oracles run it; the frozen graph has its test below.
    monkeypatch.setenv("CLIPKIT_GRAPH_MODE", "0")
    model = model_for(vision, unlocked)
    job = job_for(model, views, unlocked)
    folder = tmp_path / "shards"
    write_shards(folder, n_shards=N_SHARDS, per_shard=PER_SHARD)
    data = DataConfig(batch_size=8, workers=workers)
    lanes = fill(job, data, folder, lanes=2)
    one_lane = fill(job, data, folder, lanes=1, rows=fc.BUILD_BATCH)  # the fill before lanes
    want = direct(job, folder)
    assert set(lanes) == set(one_lane) == set(want) and len(want) == N_SHARDS * PER_SHARD
    # the fill before lanes, as benchmarks/cache_fill.py keeps it (pooled tower features only)
    before = old_fill(model, data, sorted(folder.glob("*.tar"))) if views == 1 and not unlocked else one_lane
    for key, value in want.items():
        assert lanes[key].dtype == np.float32 and lanes[key].shape == value.shape
        np.testing.assert_allclose(lanes[key], one_lane[key], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lanes[key], before[key], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lanes[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("unlocked", [0, 1], ids=["effnet", "effnet-partial"])
def test_graph_mode_runs_the_convolutional_fill_and_can_be_turned_off(graph, unlocked, tmp_path, monkeypatch):
    """The EfficientNet fill (pooled features, or the partial cache's activations) traces one
    frozen graph: batch norms folded into the convolutions, so its rows are ~1e-5 from the eager
    oracle's (``GRAPH_TOL``; the cache stores float16, 5e-4 relative), and lanes equal one lane to
    1e-6. Not with CLIPKIT_GRAPH_MODE=0, where the lanes equal the eager direct pass to 1e-6;
    never for a ViT."""
    monkeypatch.setattr(fc, "LANE_ROWS", 16)
    monkeypatch.setenv("CLIPKIT_GRAPH_MODE", "1" if graph else "0")
    made = []
    real = fc.graph_mode
    monkeypatch.setattr(fc, "graph_mode", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    folder = tmp_path / "shards"
    write_shards(folder, n_shards=N_SHARDS, per_shard=PER_SHARD)
    data = DataConfig(batch_size=8, workers=0)
    job = job_for(model_for(EFFNET, unlocked), 1, unlocked)
    rows, want = fill(job, data, folder, lanes=2), direct(job, folder)
    one_lane = fill(job, data, folder, lanes=1, rows=fc.BUILD_BATCH)
    assert len(made) == 2 and all(isinstance(m, torch.jit.ScriptModule) == graph for m in made)
    tol = GRAPH_TOL if graph else 1e-6
    worst = max(float(np.abs(rows[k] - v).max()) for k, v in want.items())
    assert worst <= tol and (worst > 0) == graph  # the graph rounds differently; eager does not
    for key in want:
        np.testing.assert_allclose(rows[key], one_lane[key], rtol=1e-6, atol=1e-6)
    vit = fill(job_for(model_for(VIT, 0), 1, 0), data, folder, lanes=2)  # one Conv2d: no graph
    assert len(made) == 3 and not isinstance(made[2], torch.jit.ScriptModule) and len(vit) == len(want)


def test_graph_mode_falls_back_to_the_eager_pass_when_the_graph_disagrees(monkeypatch, caplog):
    model = model_for(EFFNET, 0).eval()
    images = torch.rand(4, 3, 64, 64)
    real_freeze = torch.jit.freeze

    def broken(module):  # a graph whose output is off by 1
        frozen = real_freeze(module)
        return lambda x: frozen(x) + 1

    monkeypatch.setattr(torch.jit, "freeze", broken)
    run = graph_mode(model.tower_features, model.vision, images)
    assert run == model.tower_features and "disagrees with its eager pass" in caplog.text
    monkeypatch.setattr(torch.jit, "freeze", lambda m: (_ for _ in ()).throw(RuntimeError("no trace")))
    assert graph_mode(model.tower_features, model.vision, images) == model.tower_features
    assert "cannot trace" in caplog.text and "no trace" in caplog.text
    monkeypatch.undo()
    # nothing traced for bf16, nor for a tower that trains (its batch norms are not constants)
    assert graph_mode(model.tower_features, model.vision, images, "bf16") == model.tower_features
    nn = torch.nn
    unlocked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)).train()
    assert graph_mode(unlocked, unlocked, images) is unlocked
    assert isinstance(graph_mode(unlocked, unlocked.eval(), images), torch.jit.ScriptModule)


@pytest.mark.parametrize("kind", ["vit", "vit-views"])
def test_stored_cache_is_the_float16_of_the_lanes_rows(kind, tmp_path, monkeypatch):
    vision, views, unlocked, _ = KINDS[kind]
    monkeypatch.setattr(fc, "LANE_ROWS", 16)
    monkeypatch.setattr(fc, "cpu_lanes", lambda device: 2)  # as on a 2-core machine
    model = model_for(vision, unlocked)
    folder = tmp_path / "shards"
    spec = write_shards(folder, n_shards=N_SHARDS, per_shard=PER_SHARD)
    data = DataConfig(batch_size=8, workers=0)
    cache, report = fc.build_feature_cache(model, data, spec, tmp_path / "run", progress=False, views=views)
    assert f"{N_SHARDS * PER_SHARD} computed now" in report and "2 lanes" in report
    rows = fill(job_for(model, views, unlocked), data, folder, lanes=2)
    for key, value in rows.items():
        stored = np.stack([cache.get(key, v) for v in range(views)]) if views > 1 else cache.get(key)
        np.testing.assert_array_equal(stored, value.astype(np.float16).astype(np.float32))


def test_last_batch_takes_the_remainder(tmp_path):
    """Batches of ``rows // views`` images; the remainder joins the last one (no short tail)."""
    model = model_for(VIT, 0)
    folder = tmp_path / "shards"
    write_shards(folder, n_shards=3, per_shard=7)  # 21 images; loader batches of 5 from 2 workers
    shards = sorted(folder.glob("*.tar"))
    keys = {k for ks in fc.scan_keys(shards).values() for k in ks}
    job = job_for(model, 1, 0)
    sizes = [len(k) for k, _ in fc._image_batches(job, DataConfig(workers=2), shards, keys, rows=5)]
    assert sizes == [5, 5, 5, 6]
    wanted = set(sorted(keys)[:9])  # a partial fill picks only the missing keys
    picked = [
        k for ks, _ in fc._image_batches(job, DataConfig(workers=0), shards, wanted, rows=4) for k in ks
    ]
    assert sorted(picked) == sorted(wanted)
    views = [im.shape for _, im in fc._image_batches(job_for(model_for(KINDS["vit-views"][0], 0), 3, 0),
                                                       DataConfig(workers=0), shards, keys, rows=6)]  # fmt: skip
    assert views[0] == (2, 3, 3, 32, 32) and sum(s[0] for s in views) == 21


def test_lanes_run_at_once_in_order_on_one_thread_each():
    barrier = threading.Barrier(2, timeout=20)  # breaks unless two calls run at the same time
    seen = []

    def fn(i: int) -> int:
        if i < 2:
            barrier.wait()
        seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return i * i

    before = torch.get_num_threads()
    out = list(in_lanes(fn, range(7), lanes=2))
    assert out == [(i, i * i) for i in range(7)]
    assert seen and all(s == (1, True) for s in seen)
    assert torch.get_num_threads() == before
    # one lane: the caller's thread, its thread count untouched
    assert list(in_lanes(lambda i: (torch.get_num_threads(), torch.is_inference_mode_enabled()), [0], 1)) == [
        (0, (before, True))
    ]
    assert cpu_lanes("cpu") == max(1, before) and cpu_lanes("meta") == 1


def test_a_lane_keeps_one_thread_when_the_caller_changes_its_count_meanwhile():
    """The fill decodes in the caller's thread (workers=0), which sets its torch thread count
    around each batch while the lanes run. torch sets a new thread's count up lazily from the
    count set last, so a lane that had only called ``set_num_threads(1)`` could run on the
    caller's two threads, on other kernels: its rows differed in the last bits now and then
    (tests/test_cache_fill.py's float16 test failed one run in ten on an AVX-512 CPU)."""
    torch.set_num_threads(2)  # the caller's count, as on a 2-core machine
    started, changed, read = threading.Event(), threading.Event(), threading.Event()

    def items():
        yield 0
        assert started.wait(timeout=20)  # item 0's lane has set its count and runs fn
        torch.set_num_threads(1)  # the loader's decoding thread count, then back
        torch.set_num_threads(2)
        changed.set()
        assert read.wait(timeout=20)  # no other lane starts (and sets the count) before it reads
        yield 1

    def fn(i: int) -> int:
        if i == 0:
            started.set()
            assert changed.wait(timeout=20)
        threads = torch.get_num_threads()
        read.set()
        return threads

    try:
        assert list(in_lanes(fn, items(), lanes=2)) == [(0, 1), (1, 1)]
    finally:
        torch.set_num_threads(max(1, cpu_lanes("cpu")))


def test_a_failing_lane_raises_and_restores_the_threads():
    before = torch.get_num_threads()

    def fn(i: int) -> int:
        if i == 3:
            raise RuntimeError("lane 3 broke")
        return i

    with pytest.raises(RuntimeError, match="lane 3 broke"):
        list(in_lanes(fn, range(10), lanes=2))
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="precision"):
        list(in_lanes(fn, range(2), lanes=2, precision="fp16"))


def test_bf16_fill_reports_whether_the_cpu_has_it(tmp_path, monkeypatch):
    """bf16 is never assumed: the report says whether the CPU computes in it or only emulates it."""
    model = model_for(VIT, 0)
    data = DataConfig(batch_size=8, workers=0)
    for name, found, said in [
        ("has", "CPU flags avx512_bf16", "bf16 autocast (CPU flags avx512_bf16)"),
        ("lacks", None, "bf16 autocast emulated: cpu has no native bf16"),
    ]:
        monkeypatch.setattr(fc, "bf16_support", lambda device, found=found: found)
        spec = write_shards(tmp_path / name, n_shards=1, per_shard=4)
        cache, report = fc.build_feature_cache(
            model, data, spec, tmp_path / "run", progress=False, precision="bf16"
        )
        assert said in report and cache.folder.name.endswith("-bf16") and len(cache) == 4
    _, fp32 = fc.build_feature_cache(model, data, spec, tmp_path / "run", progress=False)
    assert "autocast" not in fp32
