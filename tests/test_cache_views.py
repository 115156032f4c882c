"""Augmented views in the feature cache (``train.cache_views``): K views per key, each equal to the
tower run on the augmentation seeded by (view seed, key, view); one view drawn per training step
from (seed, epoch, key); exact resume; one cache folder per setting."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from training_helpers import tiny_tree, write_shards

from clipkit.config import AugmentConfig, Config, ConfigError, DataConfig, ModelConfig, TowerConfig, from_dict
from clipkit.data import build_loader
from clipkit.data.augment import Silhouette, augmented_transform, draw_view, view_seed, views_fingerprint
from clipkit.models import TOWERS, build_model, build_tower
from clipkit.training import feature_cache as fc

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = DataConfig(batch_size=8, workers=0)
VIEWS = 3
# Strong settings, so that views differ visibly; every step of the pipeline is on.
STRONG = AugmentConfig(
    scale=[0.3, 1.0], hflip=0.5, silhouette=0.3, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
    grayscale=0.2, invert=0.3, blur=0.3,
)  # fmt: skip


def model_with(augmentation: AugmentConfig = STRONG, augment: bool = True):
    torch.manual_seed(0)
    vision = TowerConfig(
        name="open_clip:clipkit-tiny-ViT",
        locked=True,
        image_size=32,
        augment=augment,
        augmentation=augmentation,
    )
    text = TowerConfig(name="open_clip:clipkit-tiny-ViT", context_length=16)
    return build_model(ModelConfig(vision=vision, text=text, embed_dim=16))


@pytest.fixture(scope="module")
def model():
    return model_with()


@pytest.fixture(scope="module")
def built(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("views")
    spec = write_shards(folder / "shards", n_shards=2, per_shard=8)
    cache, report = fc.build_feature_cache(model, DATA, spec, folder / "run", progress=False, views=VIEWS)
    return spec, cache, report


def images_of(spec_folder: Path) -> dict[str, Image.Image]:
    out = {}
    for shard in sorted(spec_folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    data = tar.extractfile(member).read()
                    out[member.name.split(".")[0]] = Image.open(io.BytesIO(data)).convert("RGB")
    return out


def oracle_seed(seed: int, key: str, view: int) -> int:
    """The documented seed of a view, written out: a changed formula would orphan every cache."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:{view}".encode()).digest()[:8], "little") & (
        2**63 - 1
    )


# ---------------------------------------------------------------------------- the cache's content


def test_cache_holds_k_views_each_the_tower_on_its_seeded_augmentation(built, model):
    spec, cache, report = built
    assert cache.views == VIEWS and f"{VIEWS} views each" in report
    assert f"-views{VIEWS}-" in cache.folder.name
    part = np.load(cache.folder / cache.parts[0]["file"])
    assert part.shape == (16, VIEWS, model.vision.out_dim) and part.dtype == np.float16
    eval_tf, train_tf = model.image_transform(train=False), model.image_transform(train=True)
    model.eval()
    for key, img in images_of(Path(spec).parent).items():
        views = [cache.get(key, v) for v in range(VIEWS)]
        with torch.no_grad():
            want = [model.vision(eval_tf(img)[None])[0].numpy()]  # view 0: the eval transform
            for v in range(1, VIEWS):
                torch.manual_seed(oracle_seed(0, key, v))
                want.append(model.vision(train_tf(img)[None])[0].numpy())
        for v in range(VIEWS):
            np.testing.assert_allclose(views[v], want[v], rtol=2e-3, atol=2e-3)  # fp16 storage
        for a in range(VIEWS):  # distinct views
            for b in range(a + 1, VIEWS):
                assert np.abs(views[a] - views[b]).max() > 1e-2, (key, a, b)
    with pytest.raises(IndexError, match="3 view"):
        cache.get(cache.keys[0], VIEWS)


def test_second_build_computes_nothing_and_single_view_cache_is_todays(tmp_path, built, model):
    spec, cache, _ = built
    again, report = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False, views=VIEWS)
    assert "nothing to compute" in report and again.folder == cache.folder
    np.testing.assert_array_equal(again.get(cache.keys[3], 2), cache.get(cache.keys[3], 2))
    # views=1 (and 0): the cache of old, in the tower's own folder, rows (N, F), today's keys.json.
    for views in (0, 1):
        one, _ = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False, views=views)
        assert one.folder.name == model.vision.fingerprint() and one.views == 1
        meta = json.loads((one.folder / "keys.json").read_text())
        assert set(meta) == {"fingerprint", "tower", "version", "dim", "parts", "keys", "absent"}
        assert np.load(one.folder / one.parts[0]["file"]).shape == (16, model.vision.out_dim)
        for key in cache.keys:  # view 0 is the eval view
            np.testing.assert_array_equal(one.get(key), cache.get(key, 0))


def test_every_setting_is_another_cache_folder(model):
    tower = model.vision
    base = fc.cache_fingerprint(tower, views=VIEWS)
    assert fc.cache_fingerprint(tower) == fc.cache_fingerprint(tower, views=1) == tower.fingerprint()
    assert fc.cache_fingerprint(tower, views=4) != base
    names = {base}
    for change in [
        {"scale": [0.5, 1.0]},
        {"hflip": 0.0},
        {"invert": 0.5},
        {"blur_sigma": [0.1, 1.0]},
        {"view_seed": 1},
    ]:
        other = model_with(AugmentConfig(**{**STRONG.__dict__, **change})).vision
        names.add(fc.cache_fingerprint(other, views=VIEWS))
    assert len(names) == 6
    # The same settings written as ints or floats are one cache.
    assert views_fingerprint(AugmentConfig(scale=[0.5, 1]), 2) == views_fingerprint(
        AugmentConfig(scale=[0.5, 1.0]), 2
    )


def test_views_need_an_augmenting_tower(tmp_path):
    spec = write_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    plain = model_with(augment=False)
    with pytest.raises(Exception, match="model.vision.augment=true"):
        fc.build_feature_cache(plain, DATA, spec, tmp_path / "run", progress=False, views=2)
    with pytest.raises(ConfigError, match="model.vision.augment=true"):
        from_dict(Config, {"train": {"cache_views": 4}})
    with pytest.raises(ConfigError, match="cache_views must be >= 0"):
        from_dict(Config, {"train": {"cache_views": -1}})
    with pytest.raises(ConfigError, match="augmentation.scale"):
        from_dict(Config, {"model": {"vision": {"augmentation": {"scale": [0.9, 0.5]}}}})
    with pytest.raises(ConfigError, match="augmentation.invert"):
        from_dict(Config, {"model": {"vision": {"augmentation": {"invert": 1.5}}}})


def test_when_views_are_cached(model):
    vision = {"locked": True, "augment": True}
    augmenting = from_dict(Config, {"model": {"vision": vision}})
    assert "cache_views" in fc.why_not_cached(augmenting, model)  # one random view per step: uncached
    views = from_dict(Config, {"model": {"vision": vision}, "train": {"cache_views": 4}})
    assert fc.why_not_cached(views, model) is None
    unlocked = from_dict(
        Config, {"model": {"vision": {**vision, "unlocked_layers": 1}}, "train": {"cache_views": 4}}
    )
    assert "unlocked_layers=1" in fc.why_not_cached(unlocked, model)


# ---------------------------------------------------------------------------- the per-step draw


def test_view_draw_is_deterministic_and_uniform():
    keys = [f"k{i}" for i in range(50)]
    first = [[draw_view(7, e, k, None, 4) for k in keys] for e in range(40)]
    assert first == [
        [draw_view(7, e, k, None, 4) for k in keys] for e in range(40)
    ]  # same inputs, same views
    assert first != [[draw_view(8, e, k, None, 4) for k in keys] for e in range(40)]  # the seed matters
    counts = Counter(v for row in first for v in row)  # 2000 draws over 4 views
    expected = len(keys) * 40 / 4
    chi2 = sum((counts[v] - expected) ** 2 / expected for v in range(4))
    assert sorted(counts) == [0, 1, 2, 3] and chi2 < 16.3  # chi-square, 3 dof, p = 0.001
    for k in keys[:10]:  # each key sees every view over the epochs
        assert {row[keys.index(k)] for row in first} == {0, 1, 2, 3}
    # Resampled: the epoch stays 0, the draw index makes a repeat draw anew.
    assert len({draw_view(7, 0, "k0", (0, d), 4) for d in range(30)}) == 4


def test_loader_serves_the_drawn_view_in_training_and_view_0_in_evaluation(built, model):
    spec, cache, _ = built
    served: dict[str, list[int]] = {}
    for epoch in range(6):
        loader = build_loader(
            DATA, spec, None, model.tokenize, train=True, seed=3, epoch=epoch, feature_lookup=cache
        )
        for batch in loader:
            for row, key in zip(batch["image_features"], batch["key"]):
                view = draw_view(3, epoch, key, None, VIEWS)  # the oracle's choice
                np.testing.assert_array_equal(row.numpy(), cache.get(key, view))
                served.setdefault(key, []).append(view)
    assert all(len(v) == 6 for v in served.values()) and len(served) == 16
    assert {v for views in served.values() for v in views} == set(range(VIEWS))
    loader = build_loader(DATA, spec, None, model.tokenize, train=False, seed=3, feature_lookup=cache)
    for batch in loader:
        for row, key in zip(batch["image_features"], batch["key"]):
            np.testing.assert_array_equal(row.numpy(), cache.get(key, 0))


def test_resampled_repeats_draw_other_views(built, model):
    spec, cache, _ = built
    cfg = DataConfig(batch_size=8, workers=0, resampled=True, shuffle_buffer=0)
    loader = build_loader(cfg, spec, None, model.tokenize, train=True, seed=1, feature_lookup=cache)
    rows: dict[str, set[bytes]] = {}
    for i, batch in enumerate(loader):
        for row, key in zip(batch["image_features"], batch["key"]):
            rows.setdefault(key, set()).add(row.numpy().tobytes())
        if i == 15:  # 128 samples: each of the 16 keys about 8 times
            break
    assert max(len(v) for v in rows.values()) == VIEWS  # repeats of a key get other views


# ---------------------------------------------------------------------------- training


def test_resume_is_exact_with_views(tmp_path):
    from clipkit.training import checkpoint as ckpt
    from clipkit.training import loop

    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=12)  # 24 samples: 3 steps per epoch

    def tree(name: str, **extra) -> dict:
        return tiny_tree(
            shards,
            tmp_path / "runs",
            **{
                "model.vision.augment": True,
                "model.vision.augmentation": {"scale": [0.4, 1.0], "hflip": 0.5, "invert": 0.3},
                "train.cache_views": VIEWS,
                "train.samples": 72,  # 9 steps over 3 epochs
                "train.checkpoint_every": 4,
                "train.keep_last": 5,
                "train.deterministic": True,
                "train.run_name": name,
                **extra,
            },
        )

    reference = loop.train(from_dict(Config, tree("reference")))
    caches = [p.name for p in (tmp_path / "shards" / fc.CACHE_DIRNAME).iterdir()]
    assert len(caches) == 1 and f"-views{VIEWS}-" in caches[0], caches
    mid = reference / "checkpoints" / "step_00000004.pt"
    assert mid.is_file()
    resumed = loop.train(from_dict(Config, tree("resumed", **{"train.resume": str(mid)})))
    want, got = ckpt.load(ckpt.latest(reference)), ckpt.load(ckpt.latest(resumed))
    assert want["step"] == got["step"] == 9
    for key in want["model"]:
        assert torch.equal(want["model"][key], got["model"][key]), key  # bit for bit


# ---------------------------------------------------------------------------- the transforms


def test_default_augmentation_is_todays_random_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    ours = augmented_transform(32, mean, std, AugmentConfig())
    bicubic = T.InterpolationMode.BICUBIC
    old = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.9, 1.0), interpolation=bicubic),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    for seed in range(5):
        torch.manual_seed(seed)
        a = ours(img)
        torch.manual_seed(seed)
        assert torch.equal(a, old(img))


def test_silhouette_and_invert():
    x = np.full((20, 20, 3), 255, dtype=np.uint8)  # white background
    x[5:15, 6:12] = (200, 30, 30)  # a red shape
    out = np.asarray(Silhouette(1.0)(Image.fromarray(x)))
    want = np.zeros((20, 20), dtype=np.uint8)
    want[5:15, 6:12] = 255  # white on black
    assert (out == want[..., None]).all()
    assert np.array_equal(np.asarray(Silhouette(0.0)(Image.fromarray(x))), x)  # p = 0: unchanged
    fixed = AugmentConfig(scale=[1.0, 1.0], ratio=[1.0, 1.0], invert=1.0)
    inverted = augmented_transform(20, (0.0,) * 3, (1.0,) * 3, fixed)(Image.fromarray(x))
    torch.testing.assert_close(inverted, 1 - torch.from_numpy(x).permute(2, 0, 1).float() / 255)


VISION_EXAMPLES = [
    pytest.param(kw, id=kw["name"])
    for prefix in TOWERS.names()
    for modality, kw in TOWERS.get(prefix).examples
    if modality == "vision"
]


@pytest.mark.parametrize("kwargs", VISION_EXAMPLES)
def test_every_vision_tower_trains_on_the_configured_augmentation(kwargs):
    """The uncached training transform of each tower kind follows model.vision.augmentation."""
    size = kwargs["image_size"]
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8))
    whole = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}  # the crop is the whole (square) image
    plain = build_tower(TowerConfig(**kwargs, augment=True, augmentation=AugmentConfig(**whole)), "vision")
    flipped = build_tower(
        TowerConfig(**kwargs, augment=True, augmentation=AugmentConfig(**whole, hflip=1.0)), "vision"
    )
    a, b = plain.transform(train=True)(img), flipped.transform(train=True)(img)
    assert a.shape == (3, size, size)
    torch.testing.assert_close(b, torch.flip(a, dims=[-1]), atol=0, rtol=0)
    assert not plain.deterministic_transform and plain.augmentation.scale == [1.0, 1.0]


def test_view_seed_formula_is_stable():
    for seed, key, view in [(0, "s000_0001", 2), (5, "emoji_1f600", 1), (0, "k", 0)]:
        assert view_seed(seed, key, view) == oracle_seed(seed, key, view)
