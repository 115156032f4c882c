"""The loader's fast image path against torchvision as the oracle: same crops, the same pixels where
no DCT draft applies, close pixels where it does, bit-identical normalisation, same batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import encode, photo
from open_clip.transform import PreprocessCfg, image_transform_v2
from torchvision import transforms as T

import clipkit.data.fast_transform as ft
from clipkit.config import DataConfig
from clipkit.data import ShardWriter, SkipStats, build_loader
from clipkit.data.decode import decode_image
from clipkit.data.fast_transform import plan_fast_image, resized_size
from clipkit.models.tower_base import image_transform

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t), ord(t[0])] for t in texts])


def levels(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(mean, max) absolute difference in 0-255 levels."""
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return float(d.mean()), int(d.max())


# ---------------------------------------------------------------------------- planning


def test_plan_recognises_the_usual_shapes_and_nothing_else():
    usual = [
        image_transform_v2(PreprocessCfg(size=224), is_train=True),  # open_clip train
        image_transform_v2(PreprocessCfg(size=224), is_train=False),  # open_clip eval
        image_transform(64, MEAN, STD, augment=True),  # clipkit towers
        image_transform(64, MEAN, STD, augment=False),
        T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]),
    ]
    assert all(plan_fast_image(t) is not None for t in usual)
    opted_out = image_transform(64, MEAN, STD)
    opted_out.fast_path = False
    unusual = [
        T.Compose([T.Lambda(lambda im: im), T.ToTensor()]),  # unknown step
        T.Compose([T.Resize(64), T.ToTensor(), T.RandomErasing()]),  # tensor step after ToTensor
        T.Compose([T.Resize(64), T.RandomResizedCrop(32), T.ToTensor()]),  # random crop not first
        T.Compose([T.Resize(64), T.CenterCrop(64)]),  # no ToTensor: returns PIL
        lambda im: im,
        opted_out,
    ]
    assert all(plan_fast_image(t) is None for t in unusual)


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (333, 333), (1000, 250)])
@pytest.mark.parametrize("size", [224, (100, 120)])
def test_resized_size_matches_torchvision(hw, size):
    img = photo((hw[1], hw[0]))
    assert resized_size(hw[0], hw[1], size, None) == T.Resize(size)(img).size[::-1]
    assert resized_size(hw[0], hw[1], 224, 300) == T.Resize(224, max_size=300)(img).size[::-1]


def test_normalisation_is_bit_identical_to_totensor_normalize():
    fast = plan_fast_image(T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
    arrays = [np.random.default_rng(i).integers(0, 256, (20, 30, 3), dtype=np.uint8) for i in range(5)]
    tail = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    assert torch.equal(fast.collate(arrays), torch.stack([tail(a) for a in arrays]))


# ---------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("size", [(640, 480), (60, 40)])  # down- and upsampling
def test_random_resized_crop_same_crops_and_pixels_without_a_draft(size):
    rrc = T.RandomResizedCrop(96, scale=(0.3, 1.0), interpolation=BICUBIC)
    fast = plan_fast_image(T.Compose([rrc, T.ToTensor()]))
    data = encode(photo(size, seed=2), "PNG")  # no DCT draft for a PNG
    for seed in range(8):
        torch.manual_seed(seed)
        got = fast.load(data)
        torch.manual_seed(seed)
        want = np.asarray(rrc(decode_image(data)))
        mean, worst = levels(got, want)  # torch's uint8 kernel vs PIL's: rounding only
        assert mean < 0.05 and worst <= 2


def test_jpeg_draft_gives_torchvisions_pixels_for_the_grid_snapped_crop(monkeypatch):
    rrc = T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=BICUBIC)
    fast = plan_fast_image(T.Compose([rrc, T.ToTensor()]))
    scales = []
    real = ft.draft_jpeg
    monkeypatch.setattr(ft, "draft_jpeg", lambda *a: scales.append(real(*a)) or scales[-1])
    data = encode(photo((900, 700), seed=0), "JPEG", quality=92)
    full = decode_image(data)
    for seed in range(6):
        torch.manual_seed(seed)
        got = fast.load(data)
        torch.manual_seed(seed)
        top, left, h, w = rrc.get_params(full, rrc.scale, rrc.ratio)  # the same draw
        s = scales[-1]
        box = [round(left / s) * s, round(top / s) * s, round((left + w) / s) * s, round((top + h) / s) * s]
        snapped = np.asarray(
            full.resize((224, 224), 3, box=[min(box[0], 900), box[1], min(box[2], 900), min(box[3], 700)])
        )
        exact = np.asarray(full.crop((left, top, left + w, top + h)).resize((224, 224), 3))
        assert levels(got, snapped)[0] < 1.5  # DCT-domain 1/2 + bicubic ~ bicubic from full size
        assert levels(got, exact)[0] < 4.0  # crop corners moved by at most 1 px of 900
    assert set(scales) == {2}  # every crop kept >= 224 px after a 1/2 DCT downscale


def test_eval_resize_center_crop_exact_for_png_close_for_odd_sized_jpeg():
    tf = image_transform_v2(PreprocessCfg(size=224), is_train=False)
    fast = plan_fast_image(tf)
    png = encode(photo((500, 375), seed=1), "PNG")
    assert torch.equal(fast.collate([fast.load(png)]), tf(decode_image(png))[None])
    std = torch.tensor(STD).view(3, 1, 1)
    for size in [(623, 467), (901, 677)]:  # odd sizes: the reduced image covers 624 / 902 px
        jpg = encode(photo(size, seed=1), "JPEG", quality=92)
        want = tf(decode_image(jpg))  # no draft
        boxless = tf(decode_image(jpg, draft_size=224))  # draft, then a resize of the whole 312 px
        got = fast.collate([fast.load(jpg)])[0]
        err = float(((got - want) * std * 255).abs().mean())
        assert err < 1.6 < float(((boxless - want) * std * 255).abs().mean())


# ---------------------------------------------------------------------------- in the loader


@pytest.fixture(scope="module")
def png_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fast")
    with ShardWriter(out, prefix="f", maxcount=6) as w:
        for i in range(12):
            w.write(
                {
                    "__key__": f"k{i:02d}",
                    "png": encode(photo((160 + 8 * i, 120), seed=i), "PNG"),
                    "txt": f"p{i}",
                }
            )
        w.write({"__key__": "broken", "jpg": b"\xff\xd8 not really", "txt": "x"})
        w.write({"__key__": "zero", "jpg": b"", "txt": "x"})
    return str(out)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_fast_path_equals_the_plain_path(png_shards, workers):
    fast_tf = image_transform(64, MEAN, STD, augment=False)
    plain_tf = image_transform(64, MEAN, STD, augment=False)
    plain_tf.fast_path = False
    cfg = DataConfig(batch_size=4, workers=workers)
    fast = list(build_loader(cfg, png_shards, fast_tf, tokenize, train=False, seed=0))
    plain = list(build_loader(cfg, png_shards, plain_tf, tokenize, train=False, seed=0))
    assert [b["key"] for b in fast] == [b["key"] for b in plain]
    for a, b in zip(fast, plain):
        assert a["image"].dtype == torch.float32 and a["image"].shape == b["image"].shape
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["idx"], b["idx"])
    stats = SkipStats()
    for b in fast:
        stats.update(b)
    assert dict(stats.by_kind) == {"decode_error": 1, "empty_image": 1}


def test_loader_fast_train_path_shapes_and_seeded_determinism(png_shards):
    tf = image_transform_v2(PreprocessCfg(size=48), is_train=True)
    cfg = DataConfig(batch_size=4, workers=0, shuffle_buffer=4)
    runs = [list(build_loader(cfg, png_shards, tf, tokenize, train=True, seed=3)) for _ in range(2)]
    torch.manual_seed(0)  # the crops come from torch's RNG, seeded per run by the loader
    assert [b["key"] for b in runs[0]] == [b["key"] for b in runs[1]]
    assert runs[0][0]["image"].shape == (4, 3, 48, 48)
