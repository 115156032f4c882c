"""Partial feature cache: a locked vision tower's unlocked top layers trained from cached activations.

Oracles: the uncached model itself. A tower cut at a layer boundary computes exactly its forward;
training from the cache gives the gradients and weights of an uncached run whose bottom output is
rounded to float16 as the cache stores it (a forward hook on the last bottom block), and, within
float16's precision, those of a plain uncached run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from training_helpers import tiny_tree, write_shards

from clipkit.config import Config, DataConfig, ModelConfig, TowerConfig, from_dict
from clipkit.data import build_loader
from clipkit.losses import build_loss
from clipkit.models import build_model
from clipkit.models.tower_base import NoSplit
from clipkit.models.towers import build_tower
from clipkit.training import partial_cache as pc

DATA = DataConfig(batch_size=8, workers=0)
TEXT = TowerConfig(name="open_clip:clipkit-tiny-ViT", context_length=16)
# (vision tower, unlocked layers to test): one kind each of the split implementations.
TOWERS = {
    "open_clip-vit": (TowerConfig(name="open_clip:clipkit-tiny-ViT", image_size=32), (1, 2)),
    "timm-effnet-lite0": (
        TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled", image_size=64),
        (1, 2),
    ),
    "hf-clip": (TowerConfig(name="hf-clip:clipkit-tiny-clip", image_size=32), (1, 2)),
    "timm-effnet-lite0-grid2": (  # the head pools over a 2x2 grid (model.vision.pool_grid)
        TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled", image_size=64, pool_grid=2),
        (1,),
    ),
}


def build(vision: TowerConfig, k: int):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=TowerConfig(**{**vision.__dict__, "locked": True, "unlocked_layers": k}),
        text=TEXT,
        embed_dim=16,
    )
    return build_model(cfg)


def stored_hook(model, k: int, stored: torch.Tensor):
    """Make the last block below the top ``k`` layers output ``stored`` (what the cache holds for
    the batch) after checking that its own output rounds to it: float16, one step (rtol), and
    the cache's pass runs other kernels (channels-last, and a frozen graph with the batch norms
    folded in, ``graph_mode``), which put an element up to ~1e-5 absolute away, more on some CPUs:
    1.3e-5 with the eager channels-last pass on this AVX-512 machine, where atol 1e-5 failed
    before graph mode too."""
    layers = model.vision.layers()
    block = layers[len(layers) - k - 1].m0  # the one module of that layer (a block)

    def swap(module, inputs, out):
        torch.testing.assert_close(out.detach(), stored, rtol=2**-10, atol=5e-5)
        return stored

    return block.register_forward_hook(swap)


def batches(model, cache, spec: str):
    """(image batch, activation batch) of the same samples, in the same order."""
    return next(iter(zip(*loaders(model, cache, spec))))


def loaders(model, cache, spec: str):
    """Eval-order loaders of the images and of the cached activations."""
    images = build_loader(DATA, spec, model.image_transform(False), model.tokenize, train=False, seed=0)
    cached = build_loader(DATA, spec, None, model.tokenize, train=False, seed=0, feature_lookup=cache)
    return images, cached


def step(model, loss_fn, inputs: dict) -> dict[str, torch.Tensor]:
    """Loss backward on ``inputs``; the trainable parameters' gradients (then zeroed)."""
    out = model({k: v for k, v in inputs.items() if k in ("image", "image_activations", "text")})
    loss_fn(out, inputs)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


# ---------------------------------------------------------------------------- the cut


@pytest.mark.parametrize(
    "vision",
    [
        *(cfg for cfg, _ in TOWERS.values()),
        TowerConfig(name="timm:resnet18", image_size=32),
        TowerConfig(name="hf-clip:clipkit-tiny-siglip", image_size=32),
    ],
    ids=lambda c: c.name,
)
def test_a_split_tower_computes_its_forward(vision):
    torch.manual_seed(0)
    tower = build_tower(vision, "vision").eval()
    x = torch.randn(3, 3, vision.image_size, vision.image_size)
    n = len(tower.layers())
    with torch.no_grad():
        ref = tower(x)
        for k in sorted({1, 2, n // 2, n - 1}):
            split = tower.split_at(k)
            assert split.at == tower.layers()[n - k].group_name
            torch.testing.assert_close(split.top(split.bottom(x)), ref, rtol=0, atol=1e-6)
    for k in (0, n):  # nothing to train above, or nothing frozen below
        with pytest.raises(NoSplit, match="1 <= unlocked_layers"):
            tower.split_at(k)


def test_a_tower_that_cannot_split_says_so_and_trains_uncached(tmp_path):
    model = build(TowerConfig(name="open_clip:clipkit-tiny-RN", image_size=64), 1)
    with pytest.raises(NoSplit, match="ModifiedResNet.*open_clip ViT image towers only"):
        model.vision.split_at(1)
    cfg = from_dict(Config, {"model": {"vision": {"locked": True, "unlocked_layers": 1}}})
    why = pc.why_not_partial(cfg, model)
    assert "ModifiedResNet" in why
    cache, note = pc.partial_or_off(cfg, model, tmp_path, None, "its top layers train")
    assert cache is None and note == f"off (its top layers train; no partial cache: {why})"


def test_when_the_partial_cache_applies():
    model = build(TOWERS["open_clip-vit"][0], 1)

    def why(**vision):
        tree = {"model": {"vision": {"locked": True, "unlocked_layers": 1, **vision}}}
        return pc.why_not_partial(from_dict(Config, tree), model)

    assert why() is None
    assert "locked=false" in why(locked=False)
    assert "unlocked_layers=0" in why(unlocked_layers=0)
    vision = {"locked": True, "unlocked_layers": 1}
    off = from_dict(Config, {"model": {"vision": vision}, "train": {"feature_cache": False}})
    assert pc.why_not_partial(off, model) == "train.feature_cache=false"
    augmenting = build(TowerConfig(name="open_clip:clipkit-tiny-ViT", image_size=32, augment=True), 1)
    tree = {"model": {"vision": {"locked": True, "unlocked_layers": 1}}}
    assert "augmenting" in pc.why_not_partial(from_dict(Config, tree), augmenting)


# ---------------------------------------------------------------------------- training from the cache


@pytest.mark.parametrize("kind", list(TOWERS))
def test_gradients_equal_an_uncached_run(kind, tmp_path):
    vision, ks = TOWERS[kind]
    spec = write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    loss_fn = build_loss(from_dict(Config, {}).loss)
    for k in ks:
        model = build(vision, k).train()
        cache, report = pc.build_partial_cache(model, DATA, spec, tmp_path / "run", k, progress=False)
        assert "8 computed now" in report and cache.folder.name.startswith("partial-")
        images, cached = batches(model, cache, spec)
        assert images["key"] == cached["key"] and "image_features" not in cached
        acts = cached["image_activations"]  # (B, *S), float16 values as float32
        assert acts.dtype == torch.float32 and torch.equal(acts, acts.half().float())

        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        cached_grads = step(model, loss_fn, cached)
        # The uncached run, its bottom's output as stored. An open_clip ViT's last block runs for
        # its class token only (clipkit.models.pooled_block), not as a module the hook sees: the
        # oracle runs open_clip's own forward.
        pooled = getattr(model.vision, "pooled_last_block", False)
        model.vision.pooled_last_block = False
        hook = stored_hook(model, k, acts)
        rounded_grads = step(model, loss_fn, images)
        hook.remove()
        model.vision.pooled_last_block = pooled
        plain_grads = step(model, loss_fn, images)  # the plain uncached run
        top = {n for n in trainable if n.startswith("vision.")}
        assert top and set(cached_grads) == trainable == set(rounded_grads)
        for name in trainable:
            torch.testing.assert_close(cached_grads[name], rounded_grads[name], rtol=1e-5, atol=1e-7)
            # and the plain uncached run's, as a whole tensor, within what float16 storage moves
            # them (2**-11 relative per activation; sums over positions cancel and amplify: ~2%;
            # a gradient that is zero in exact arithmetic, e.g. an attention key's bias, is noise)
            diff, size = (cached_grads[name] - plain_grads[name]).norm(), plain_grads[name].norm()
            assert diff <= 5e-2 * size + 1e-6, (name, float(diff), float(size))


def test_training_steps_end_with_the_uncached_weights(tmp_path):
    """Five AdamW steps on two batches: from the cache, and uncached with the bottom's output as stored."""
    vision, _ = TOWERS["timm-effnet-lite0"]
    k = 2  # the last block (with BatchNorm, pinned in eval mode) and the head train
    spec = write_shards(tmp_path / "shards", n_shards=1, per_shard=16)
    model = build(vision, k).train()
    cache, _ = pc.build_partial_cache(model, DATA, spec, tmp_path / "run", k, progress=False)
    pairs = list(zip(*loaders(model, cache, spec)))
    assert len(pairs) == 2 and all(i["key"] == c["key"] for i, c in pairs)
    loss_fn = build_loss(from_dict(Config, {}).loss)
    runs, trained = {}, {}
    for which in (0, 1):  # 0: images through the whole tower, 1: activations from the cache
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        for s in range(5):
            images, cached = pairs[s % 2]
            hook = stored_hook(m, k, cached["image_activations"]) if which == 0 else None
            step_grads = step(m, loss_fn, cached if which else images)
            if hook:
                hook.remove()
            for n, p in m.named_parameters():
                p.grad = step_grads.get(n)
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[which], trained[which] = dict(m.named_parameters()), m
    moved = 0
    for name, p in runs[0].items():
        torch.testing.assert_close(runs[1][name], p, rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(p, dict(model.named_parameters())[name]))
    assert moved > 0
    for which in (0, 1):  # an unlocked BatchNorm trains its affine weights, in eval mode (LiT)
        bn = trained[which].vision.model.blocks[6][0].bn1
        assert bn.weight.requires_grad and not bn.training
        assert torch.equal(bn.running_mean, model.vision.model.blocks[6][0].bn1.running_mean)


# ---------------------------------------------------------------------------- the key


def test_key_follows_k_and_the_frozen_weights_not_the_trained_ones(tmp_path):
    vision, _ = TOWERS["open_clip-vit"]
    spec = write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    model = build(vision, 1)
    first, _ = pc.build_partial_cache(model, DATA, spec, tmp_path / "run", 1, progress=False)
    again, report = pc.build_partial_cache(model, DATA, spec, tmp_path / "run", 1, progress=False)
    assert again.folder == first.folder and "nothing to compute" in report

    with torch.no_grad():  # a trained top layer (a resumed run): the same cache
        model.vision.model.proj.add_(1.0)
        model.vision.model.ln_post.weight.mul_(2.0)
    resumed, report = pc.build_partial_cache(model, DATA, spec, tmp_path / "run", 1, progress=False)
    assert resumed.folder == first.folder and "nothing to compute" in report

    model.vision.lock(2)  # another k: another cache, activations entering another block
    other_k, report = pc.build_partial_cache(model, DATA, spec, tmp_path / "run", 2, progress=False)
    assert other_k.folder != first.folder and "8 computed now" in report

    with torch.no_grad():  # other frozen weights below the cut: another cache
        model.vision.model.transformer.resblocks[0].mlp.c_fc.bias.add_(0.5)
    model.vision.lock(1)
    changed, report = pc.build_partial_cache(model, DATA, spec, tmp_path / "run", 1, progress=False)
    assert changed.folder not in (first.folder, other_k.folder) and "8 computed now" in report
    key = changed.keys[0]
    assert not np.allclose(changed.get(key), first.get(key))
    assert changed.get(key).shape == first.shape == (17, 64)  # 1 + 4x4 patch tokens, width 64


# ---------------------------------------------------------------------------- the trainer


def test_the_trainer_uses_it_and_refuses_it_over_budget(tmp_path, capsys):
    from clipkit.training import loop

    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=16)
    tree = tiny_tree(shards, tmp_path / "runs", **{"train.samples": 32, "model.vision.unlocked_layers": 1})
    run = loop.train(from_dict(Config, tree))
    plan = capsys.readouterr().out
    assert (
        "feature cache: partial, activations entering the top 1 layers (proj+ln_post...): 16 x (17, 64)"
        in plan
    )
    folders = [p.name for p in (tmp_path / "shards" / "_clipkit_cache").iterdir()]
    assert len(folders) == 1 and folders[0].startswith("partial-")
    assert (run / "checkpoints").is_dir()

    tree = tiny_tree(
        shards,
        tmp_path / "runs",
        **{
            "train.samples": 16,
            "train.run_name": "over",
            "model.vision.unlocked_layers": 1,
            "train.partial_cache_max_gb": 1e-6,  # 16 x 17 x 64 x 2 bytes = 35 kB > 1 kB
        },
    )
    loop.train(from_dict(Config, tree))
    plan = capsys.readouterr().out
    assert "no partial cache: activations entering the top 1 layers" in plan
    assert "over train.partial_cache_max_gb=1e-06; raise it or unlock fewer layers" in plan


def test_augmented_views_are_cached_below_the_cut_too(tmp_path):
    """``train.cache_views=K``: K views per key, each the bottom of the feature cache's same view."""
    from clipkit.config import AugmentConfig
    from clipkit.training import feature_cache as fc

    augmentation = AugmentConfig(scale=[0.3, 1.0], hflip=0.5, brightness=0.4, grayscale=0.3)
    vision = TowerConfig(
        name="open_clip:clipkit-tiny-ViT", image_size=32, augment=True, augmentation=augmentation
    )
    model = build(vision, 1)
    spec = write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    cache, report = pc.build_partial_cache(model, DATA, spec, tmp_path / "run", 1, progress=False, views=3)
    assert cache.views == 3 and cache.shape == (17, 64) and "3 views each" in report
    assert cache.folder.name.startswith("partial-") and "-views3-" in cache.folder.name
    full, _ = fc.build_feature_cache(model, DATA, spec, tmp_path / "run", progress=False, views=3)
    split = model.vision.split_at(1)
    model.eval()
    for key in cache.keys:
        acts = torch.stack([torch.from_numpy(cache.get(key, v)) for v in range(3)])  # (3, 17, 64)
        with torch.no_grad():
            pooled = split.top(acts).numpy()  # (3, out_dim)
        np.testing.assert_allclose(
            pooled, np.stack([full.get(key, v) for v in range(3)]), rtol=1e-2, atol=1e-2
        )
        assert np.abs(pooled[1] - pooled[2]).max() > 1e-2  # distinct views
    batch = next(
        iter(build_loader(DATA, spec, None, model.tokenize, train=True, seed=0, feature_lookup=cache))
    )
    assert batch["image_activations"].shape == (8, 17, 64)
