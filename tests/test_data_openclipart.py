"""data_tools/build_openclipart on the real Debian packages: captions from SVG metadata, a small
category-mixed build that the loader reads, resumable re-runs."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clipkit.data.shards import read_sizes
from clipkit.data.tario import iter_samples
from clipkit.evaluation.dataspec import open_dataset
from data_tools import build_openclipart as oc


@pytest.fixture(autouse=True, scope="module")
def debian_openclipart():
    # `make test` installs them (make debs); a missing package is a broken set-up, not a skip.
    if not (oc.ROOT / "png").is_dir() or not (oc.ROOT / "svg").is_dir():
        pytest.fail(
            f"Debian packages openclipart-png / openclipart-svg are needed ({oc.ROOT}): run make debs"
        )


def test_captions_from_title_and_keywords():
    title, words = oc.svg_metadata(oc.ROOT / "svg/animals/mammals/dogs/bored_dog_01.svg")
    assert (title, words) == ("Bored dog", ["mammal", "dog", "animal"])
    assert oc.caption_of(title, words) == "Bored dog: mammal, animal"  # "dog" is in the title
    assert oc.caption_of("", ["unsorted", "hash"]) is None
    assert oc.caption_of("", ["flag", "europe"]) == "flag, europe"
    assert oc.caption_of("Part_of  a set", []) == "Part_of  a set"


def test_pairs_are_distinct_drawings_with_svgs():
    pairs = oc.clipart_pairs()
    assert 6000 < len(pairs) < 8121  # symlinked duplicates taken once
    assert len({png.resolve() for _, png, _ in pairs}) == len(pairs)
    assert all(svg.suffix == ".svg" for _, _, svg in pairs[:50])


def test_small_build_is_readable_and_rerun_is_a_no_op(tmp_path):
    counts = oc.build(tmp_path, limit=40, shard_size=16)
    assert counts["train"] + counts["val"] + sum(counts["train_dropped"].values()) + sum(
        counts["val_dropped"].values()) == 40  # fmt: skip
    assert counts["val"] >= 1 and counts["train"] >= 30
    samples = []
    for name in sorted(read_sizes(tmp_path / "train")):
        with open(tmp_path / "train" / name, "rb") as f:
            samples.extend(iter_samples(f))
    assert len(samples) == counts["train"]
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and max(img.size) <= 256 and img.mode == "RGB"
        assert s["txt"].decode().strip()
    # a retrieval set for `clipkit eval`: its val split scores image <-> caption retrieval
    ds = open_dataset(f"{tmp_path}:val")
    assert ds.task == "zeroshot_retrieval" and len(list(ds)) == counts["val"]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "train").glob("*.tar")}
    assert oc.build(tmp_path, limit=40, shard_size=16) == counts
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "train").glob("*.tar")} == before


def _png(arr, mode) -> io.BytesIO:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf


def test_silhouette_is_the_alpha_mask_and_needs_a_transparent_background(tmp_path):
    import numpy as np

    rgba = np.zeros((6, 5, 4), dtype=np.uint8)
    rgba[..., :3] = 200  # colour is ignored: only the shape counts
    rgba[1:4, 2:4, 3] = 255
    rgba[0, 0, 3] = 127  # under half opaque: background
    rgba[5, 4, 3] = 128  # half opaque: shape
    (tmp_path / "shape.png").write_bytes(_png(rgba, "RGBA").getvalue())
    want = np.zeros((6, 5), dtype=np.uint8)
    want[1:4, 2:4] = 255
    want[5, 4] = 255
    assert (oc.silhouette(tmp_path / "shape.png") == want).all()
    rgba[..., 3] = 255
    (tmp_path / "opaque.png").write_bytes(_png(rgba, "RGBA").getvalue())
    (tmp_path / "rgb.png").write_bytes(_png(rgba[..., :3].copy(), "RGB").getvalue())
    assert oc.silhouette(tmp_path / "opaque.png") is None and oc.silhouette(tmp_path / "rgb.png") is None


def test_train_silhouettes_carry_their_drawings_captions(tmp_path):
    import numpy as np

    counts = oc.build(tmp_path, limit=40, shard_size=16, silhouettes=True)
    assert counts["train_silhouettes"] >= 20  # most clip art has a transparent background

    def read(split):
        out = []
        for name in sorted(read_sizes(tmp_path / split)):
            with open(tmp_path / split / name, "rb") as f:
                out.extend(iter_samples(f))
        return out

    sil, train = read("train_silhouettes"), read("train")
    assert len(sil) == counts["train_silhouettes"]
    assert {s["txt"] for s in sil} <= {s["txt"] for s in train}
    # one recipe mixes both folders: the feature cache and resume need disjoint keys
    assert all(s["__key__"].startswith("s") for s in sil)
    assert not {s["__key__"] for s in sil} & {s["__key__"] for s in train}
    for s in sil[:10]:
        grey = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L"), dtype=np.int16)
        near_binary = (np.minimum(grey, 255 - grey) < 40).mean()
        assert near_binary > 0.95 and 0 < (grey > 127).mean() < 1  # a shape, white on black
    assert oc.build(tmp_path, limit=40, shard_size=16, silhouettes=True) == counts  # a rerun: a no-op
