"""Every dataset layout (image folder, CSV/parquet manifest, clipkit shards, CLIP_benchmark
folders), format detection, rank/worker splitting, hold-out splits, and the batch transform
split (bit-identical to the per-sample transform)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from eval_helpers import (
    WORDS,
    image_folder,
    manifest,
    noisy_colors,
    square,
    wds_classification,
    wds_retrieval,
)
from PIL import Image

from clipkit.data.shards import ShardWriter
from clipkit.evaluation.dataspec import open_dataset, split_spec
from clipkit.evaluation.source import EvalDataError, KeyFilter
from clipkit.models.embed import split_transform


def pixels(sample) -> tuple[int, int, int]:
    return sample["image"].getpixel((0, 0))


# ----------------------------------------------------------------------------- image folders


def test_image_folder_reads_classes_in_sorted_order(tmp_path):
    root = image_folder(tmp_path / "colors", n=12)
    ds = open_dataset(str(root))
    assert type(ds).__name__ == "ImageFolderSource" and ds.task == "zeroshot_classification"
    assert ds.classnames == sorted(WORDS)  # blue, green, red: folder order
    want = {
        f"img{i:03d}.png": (sorted(WORDS).index(list(WORDS)[y]), c)
        for i, (c, y) in enumerate(noisy_colors(12))
    }
    samples = list(ds)
    assert len(samples) == 12
    for s in samples:
        label, color = want[s["key"].split("/")[-1]]
        assert s["label"] == label and pixels(s) == color


def test_image_folder_classnames_file_split_and_errors(tmp_path):
    root = tmp_path / "pets"
    for split in ("train", "test"):
        for cls in ("tabby_cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            square((1, 2, 3)).save(root / split / cls / "a.png")
    assert open_dataset(f"folder:{root}:test").classnames == ["dog", "tabby cat"]
    (root / "classnames.txt").write_text("a dog\na cat\n")
    assert open_dataset(str(root), split="train").classnames == ["a dog", "a cat"]
    (root / "classnames.txt").write_text("one\n")
    with pytest.raises(EvalDataError, match="lists 1 class names but .* has 2 class folders"):
        _ = open_dataset(str(root), split="train").classnames
    with pytest.raises(EvalDataError, match="has no split folder 'val/'"):
        open_dataset(f"folder:{root}:val")
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(EvalDataError, match="is empty: its 1 class folders hold no images"):
        open_dataset(f"folder:{empty}")
    (tmp_path / "bare").mkdir()
    with pytest.raises(EvalDataError, match="has no class folders"):
        open_dataset(f"folder:{tmp_path / 'bare'}")


# ----------------------------------------------------------------------------- manifests


def test_manifest_classification_by_class_name_and_split(tmp_path):
    path = manifest(tmp_path)
    ds = open_dataset(f"{path}:test")
    assert ds.task == "zeroshot_classification" and ds.classnames == sorted(WORDS)
    colors = noisy_colors(12)
    samples = list(ds)
    assert [s["key"] for s in samples] == [f"images/m{i:03d}.png" for i in range(0, 12, 4)]
    for s, i in zip(samples, range(0, 12, 4)):
        assert pixels(s) == colors[i][0] and ds.classnames[s["label"]] == list(WORDS)[colors[i][1]]
    assert len(list(open_dataset(str(path)))) == 12
    with pytest.raises(EvalDataError, match=r"no rows of split 'val'; splits: \['test', 'train'\]"):
        open_dataset(f"{path}:val")


def test_manifest_retrieval_groups_captions_and_parquet(tmp_path):
    path = manifest(tmp_path, retrieval=True, n=6)
    ds = open_dataset(str(path))
    assert ds.task == "zeroshot_retrieval"
    samples = list(ds)
    assert len(samples) == 6
    c1 = noisy_colors(6)[1][0]
    assert samples[1]["captions"] == [f"rgb {c1[0]} {c1[1]} {c1[2]}", "rgb 0 0 0"]
    pq = tmp_path / "m.parquet"
    pd.read_csv(path).to_parquet(pq)
    assert [s["captions"] for s in open_dataset(str(pq))] == [s["captions"] for s in samples]


def test_manifest_integer_labels_need_classnames(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    square((9, 9, 9)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,label\na.png,1\n")
    ds = open_dataset(str(tmp_path / "m.csv"))
    with pytest.raises(EvalDataError, match="has no classnames.txt"):
        _ = ds.classnames
    (tmp_path / "classnames.txt").write_text("x\ny\n")
    assert open_dataset(str(tmp_path / "m.csv")).classnames == ["x", "y"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("url,label\na.png,1\n", "has no image column"),
        ("image,score\na.png,1\n", "neither a label column"),
        ("image,label\n", "is empty"),
        ("image,label\nmissing.png,0\n", r"1 of its 1 images do not exist, e.g. .*missing.png"),
    ],
)
def test_manifest_errors(tmp_path, text, match):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(EvalDataError, match=match):
        list(open_dataset(str(tmp_path / "m.csv")))


# ----------------------------------------------------------------------------- clipkit shards


def test_clipkit_shards_retrieval_and_classification(tmp_path):
    import io

    def png(color):
        buf = io.BytesIO()
        square(color).save(buf, format="PNG")
        return buf.getvalue()

    with ShardWriter(tmp_path / "caps", prefix="val", maxcount=3) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "png": png((i, 0, 0)), "txt": f"caption {i}"})
    ds = open_dataset(str(tmp_path / "caps"))
    assert type(ds).__name__ == "ClipkitShards" and ds.task == "zeroshot_retrieval"
    assert [s["captions"] for s in ds] == [[f"caption {i}"] for i in range(5)]
    with ShardWriter(tmp_path / "labels", prefix="test", maxcount=10) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "png": png((0, i, 0)), "cls": str(i % 2)})
    (tmp_path / "labels" / "classnames.txt").write_text("even\nodd\n")
    ds = open_dataset(f"shards:{tmp_path / 'labels' / 'test-000000.tar'}")
    assert ds.task == "zeroshot_classification" and ds.classnames == ["even", "odd"]
    assert [s["label"] for s in ds] == [0, 1, 0, 1]


# ----------------------------------------------------------------------------- specs and detection


def test_split_spec_and_detection(tmp_path):
    assert split_spec("data/emoji:val") == (None, "data/emoji", "val")
    assert split_spec("wds:data/x") == ("wds", "data/x", None)
    assert split_spec("manifest:a/b.csv:test") == ("manifest", "a/b.csv", "test")
    assert type(open_dataset(str(wds_classification(tmp_path / "w")))).__name__ == "ClipBenchmarkWds"
    with pytest.raises(EvalDataError, match=r"'wsd:' is not a format; did you mean 'wds'"):
        open_dataset(f"wsd:{tmp_path / 'w'}")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("x")
    with pytest.raises(EvalDataError, match="cannot tell the layout"):
        open_dataset(str(tmp_path / "odd"))


# ----------------------------------------------------------------------------- ranks, workers, hold-out


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_partition_the_samples_evenly(tmp_path, world):
    ds = open_dataset(str(wds_classification(tmp_path, n=31, per_shard=7)))
    full = [(s["order"], s["key"]) for s in ds]
    parts = [[(s["order"], s["key"]) for s in ds.shard(r, world)] for r in range(world)]
    assert sorted(x for p in parts for x in p) == sorted(full)  # disjoint and complete
    assert max(map(len, parts)) - min(map(len, parts)) <= len(ds.shards)
    assert [o for o, _ in full] == sorted(o for o, _ in full)  # "order" is the reading order


def test_loader_workers_and_order(tmp_path):
    from eval_helpers import ColorModel

    from clipkit.evaluation.embed import embed_dataset

    ds = open_dataset(str(wds_retrieval(tmp_path, n=17, per_shard=4)))
    one = embed_dataset(ColorModel(), ds, batch_size=3, texts=True)
    two = embed_dataset(ColorModel(), ds, batch_size=5, num_workers=2, texts=True)
    assert one.keys == two.keys == [s["key"] for s in ds]
    torch.testing.assert_close(one.image_emb, two.image_emb)
    torch.testing.assert_close(one.text_emb, two.text_emb)
    assert torch.equal(one.text_to_image, two.text_to_image)


def test_holdout_filter_splits_keys_stably(tmp_path):
    ds = open_dataset(str(wds_classification(tmp_path, n=40)))
    test = {s["key"] for s in ds.filtered(KeyFilter(0.3, seed=1))}
    train = {s["key"] for s in ds.filtered(KeyFilter(0.3, seed=1, complement=True))}
    assert not test & train and len(test | train) == 40 and 4 <= len(test) <= 20
    assert test == {s["key"] for s in ds.shard(1, 2).filtered(KeyFilter(0.3, 1))} | {
        s["key"] for s in ds.shard(0, 2).filtered(KeyFilter(0.3, 1))
    }
    assert ds.fingerprint() != ds.filtered(KeyFilter(0.3, 1)).fingerprint()


# ----------------------------------------------------------------------------- transform split


def test_split_transform_is_bit_identical():
    import open_clip

    from clipkit.models.tower_base import image_transform

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
        for h, w in rng.integers(20, 90, (6, 2))
    ]
    for transform in (
        open_clip.image_transform(48, is_train=False),
        image_transform(40, (0.5,) * 3, (0.5,) * 3),
    ):
        per_sample, per_batch = split_transform(transform)
        assert per_batch is not None
        got = per_batch(torch.stack([per_sample(im) for im in images]))
        assert torch.equal(got, torch.stack([transform(im) for im in images]))
    plain = lambda im: torch.zeros(3)
    assert split_transform(plain) == (plain, None)


def test_transparent_images_are_composited_on_white_by_default(tmp_path):
    # CLIP_benchmark drops alpha (keeping whatever colour hides under transparent pixels).
    (tmp_path / "icons" / "star").mkdir(parents=True)
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "icons" / "star" / "a.png")
    (white,) = list(open_dataset(f"folder:{tmp_path / 'icons'}"))
    (dropped,) = list(open_dataset(f"folder:{tmp_path / 'icons'}", alpha="drop"))
    assert pixels(white) == (255, 255, 255) and pixels(dropped) == (10, 20, 30)
