"""Out-of-domain evaluation sets (data_tools/build_ood_*.py) on the real sources: scikit-learn's
digits and Debian's Oxygen icons; the layout clipkit's evaluation reads, and eval/transfer.yaml."""

from __future__ import annotations

import os
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

from clipkit.data.builders import BUILDERS
from clipkit.evaluation.datasets import ClipBenchmarkWds
from clipkit.evaluation.suite import load_suite
from data_tools import build_ood_digits, build_ood_icons, load_builders


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ood_digits")
    return out, build_ood_digits.build(out)


@pytest.fixture(scope="module")
def icons_out(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ood_icons")
    return out, build_ood_icons.build(out)


def test_builders_are_registered():
    load_builders()
    assert {"ood-digits", "ood-icons"} <= set(BUILDERS.names())


def test_digits_zero_shot_layout_and_counts(digits_out):
    out, counts = digits_out
    assert counts == {"test": 1797, "test_shards": 2, "classes": 10}
    assert (out / "classnames.txt").read_text().splitlines() == [str(d) for d in range(10)]
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all("{c}" in t for t in templates)
    ds = ClipBenchmarkWds(out)
    assert ds.task == "zeroshot_classification" and ds.classnames == [str(d) for d in range(10)]
    samples = list(ds)
    assert len(samples) == 1797 and len({s["key"] for s in samples}) == 1797
    # scikit-learn's digits hold 174-183 images per class
    assert all(174 <= n <= 183 for n in Counter(s["label"] for s in samples).values())


def test_digits_images_are_the_source_ink_on_white(digits_out):
    out, _ = digits_out
    images, labels = build_ood_digits.load_arrays()
    for s in list(ClipBenchmarkWds(out))[::211]:
        i = int(s["key"])
        assert s["label"] == labels[i]
        pixels = np.asarray(s["image"])[..., 0]  # (32, 32): each source pixel a 4x4 block
        assert pixels.shape == (32, 32)
        expected = 255 - np.round(images[i].astype(np.float64) * 255 / 16)  # (8, 8)
        assert np.array_equal(pixels[::4, ::4], expected) and np.array_equal(pixels[3::4, 3::4], expected)


def test_icons_retrieval_layout_captions_and_images(icons_out):
    out, counts = icons_out
    assert (out / "dataset_type.txt").read_text().strip() == "retrieval"
    assert 700 <= counts["test"] <= 1000 and counts["test_shards"] == 1
    ds = ClipBenchmarkWds(out)
    assert ds.task == "zeroshot_retrieval"
    samples = list(ds)
    captions = [s["captions"] for s in samples]
    assert all(len(c) == 1 for c in captions)
    flat = [c[0] for c in captions]
    assert len(set(flat)) == len(flat) == counts["test"]  # one image per caption
    assert {"camera photo", "face smile", "weather storm", "input keyboard"} <= set(flat)
    assert not any(c.startswith(("application x", "kmail", "amarok")) for c in flat)  # no apps, mimetypes
    img = next(s["image"] for s in samples if s["captions"] == ["face smile"])
    source = build_ood_icons.on_white(Image.open(build_ood_icons.ROOT / "48x48/emotes/face-smile.png"))
    assert img.size == (48, 48) and np.array_equal(np.asarray(img), np.asarray(source))
    assert np.asarray(img)[0, 0].tolist() == [255, 255, 255]  # transparent corner on white


def test_icon_pairs_skip_links_apps_and_repeated_captions(tmp_path):
    base = tmp_path / "48x48"
    for context, names in {
        "devices": ["camera-photo", "camera_photo"],
        "apps": ["kmail"],
        "emotes": ["face-wink"],
    }.items():
        (base / context).mkdir(parents=True)
        for name in names:
            Image.new("RGBA", (48, 48), (255, 0, 0, 128)).save(base / context / f"{name}.png")
    os.symlink(base / "emotes" / "face-wink.png", base / "emotes" / "face-winking.png")
    pairs = build_ood_icons.icon_pairs(tmp_path)
    assert [(c, p.name) for c, p in pairs] == [
        ("camera photo", "camera-photo.png"),
        ("face wink", "face-wink.png"),
    ]
    with pytest.raises(FileNotFoundError, match="apt-get install oxygen-icon-theme"):
        build_ood_icons.icon_pairs(tmp_path / "nowhere")


def test_rebuild_keeps_a_complete_build(digits_out):
    out, counts = digits_out
    stamp = (out / "test" / "0.tar").stat().st_mtime_ns
    assert build_ood_digits.build(out) == counts
    assert (out / "test" / "0.tar").stat().st_mtime_ns == stamp


def test_transfer_suite_names_every_set():
    suite = load_suite(ROOT / "eval" / "transfer.yaml")
    by_name = {d.name: d for d in suite.entries}
    assert set(by_name) == {
        "animal_mnist",
        "emoji_val",
        "openclipart_val",
        "glyphs_val",
        "ood_digits",
        "ood_icons",
    }
    assert by_name["ood_digits"].task == "zeroshot_classification"
    assert by_name["ood_icons"].task == "zeroshot_retrieval"
    assert by_name["openclipart_val"].split == "val"
    assert by_name["glyphs_val"].split == "val"
