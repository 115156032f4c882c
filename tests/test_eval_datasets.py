"""ClipBenchmarkWds on tiny layouts written in a tmp dir, checked against what was written
and against CLIP_benchmark's own webdataset pipeline (build_wds_dataset, restated)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipkit.evaluation.datasets import (
    ClipBenchmarkWds,
    EvalDataError,
    check_templates,
    decode_image,
    write_clip_benchmark_wds,
)

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def solid(color, size=8, mode="RGB") -> Image.Image:
    return Image.new(mode, (size, size), color)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def classification_layout(root: Path, n: int = 7, per_shard: int = 3) -> Path:
    samples = [{"image": solid(COLORS[i % 3]), "label": i % 3, "key": f"k{i:03d}"} for i in range(n)]
    write_clip_benchmark_wds(
        root,
        samples,
        ["red", "green", "blue"],
        ["a photo of {c}.", "a {c} thing"],
        samples_per_shard=per_shard,
    )
    return root


def clipbench_wds(root: Path, retrieval: bool):
    """CLIP_benchmark build_wds_dataset's pipeline for a local folder (no transform)."""
    nshards = int((root / "test" / "nshards.txt").read_text())
    pattern = str(root / "test" / f"{{0..{nshards - 1}}}.tar")
    exts = ["webp", "png", "jpg", "jpeg"]
    ds = wds.WebDataset(pattern, shardshuffle=False).decode(
        wds.autodecode.ImageHandler("pil", extensions=exts)
    )
    if retrieval:
        return ds.to_tuple(exts, "txt").map_tuple(None, str.splitlines)
    return ds.to_tuple(exts, "cls")


# ----------------------------------------------------------------------------- reading


def test_reads_back_what_was_written(tmp_path):
    ds = ClipBenchmarkWds(classification_layout(tmp_path, n=7, per_shard=3))
    assert [p.name for p in ds.shards] == ["0.tar", "1.tar", "2.tar"]
    assert ds.task == "zeroshot_classification"
    assert ds.classnames == ["red", "green", "blue"]
    assert ds.templates == ["a photo of {c}.", "a {c} thing"]
    samples = list(ds)
    assert [s["key"] for s in samples] == [f"k{i:03d}" for i in range(7)]
    assert [s["label"] for s in samples] == [i % 3 for i in range(7)]
    for i, s in enumerate(samples):
        assert s["image"].mode == "RGB"
        assert s["image"].getpixel((3, 3)) == COLORS[i % 3]


def test_matches_clip_benchmark_pipeline_classification(tmp_path):
    root = classification_layout(tmp_path, n=5, per_shard=2)
    # An RGBA sample: CLIP_benchmark drops alpha; alpha="drop" must give the same pixels.
    with tarfile.open(root / "test" / "2.tar", "a") as tar:
        data = png_bytes(solid((10, 20, 30, 0), mode="RGBA"))
        for name, payload in [("rgba.png", data), ("rgba.cls", b"1")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    ours = list(ClipBenchmarkWds(root, alpha="drop"))
    theirs = list(clipbench_wds(root, retrieval=False))
    assert len(ours) == len(theirs) == 6
    for mine, (image, label) in zip(ours, theirs):
        assert mine["label"] == label
        assert np.array_equal(np.asarray(mine["image"]), np.asarray(image))


def test_matches_clip_benchmark_pipeline_retrieval(tmp_path):
    captions = [["a red square", "crimson"], ["green"], ["", "blue one", "azure\tsquare"]]
    samples = [{"image": solid(c), "captions": caps} for c, caps in zip(COLORS, captions)]
    write_clip_benchmark_wds(tmp_path, samples, samples_per_shard=2)
    ds = ClipBenchmarkWds(tmp_path)
    assert ds.task == "zeroshot_retrieval"
    ours = list(ds)
    theirs = list(clipbench_wds(tmp_path, retrieval=True))
    assert [s["captions"] for s in ours] == [caps for _, caps in theirs] == captions
    for mine, (image, _) in zip(ours, theirs):
        assert np.array_equal(np.asarray(mine["image"]), np.asarray(image))


def test_alpha_composited_on_white(tmp_path):
    im = solid((10, 20, 30, 0), mode="RGBA")
    im.putpixel((0, 0), (10, 20, 30, 255))
    white = decode_image(png_bytes(im), alpha="white")
    assert white.mode == "RGB"
    assert white.getpixel((1, 1)) == (255, 255, 255)  # transparent -> white
    assert white.getpixel((0, 0)) == (10, 20, 30)  # opaque kept
    assert decode_image(png_bytes(im), alpha="drop").getpixel((1, 1)) == (10, 20, 30)
    la = decode_image(png_bytes(Image.new("LA", (2, 2), (0, 128))))  # half-transparent black
    assert la.getpixel((0, 0)) == (127, 127, 127)
    with pytest.raises(EvalDataError, match="alpha must be one of"):
        ClipBenchmarkWds(classification_layout(tmp_path), alpha="black")


def test_webdataset_tarwriter_shards_without_nshards(tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    for shard in (0, 2, 10):  # natural order: 0, 2, 10
        with wds.TarWriter(str(folder / f"{shard}.tar")) as sink:
            buf = io.BytesIO()
            solid(COLORS[shard % 3]).save(buf, format="JPEG", quality=95)
            both = png_bytes(solid((1, 2, 3)))
            sink.write({"__key__": f"s{shard}", "jpg": buf.getvalue(), "png": both, "cls": shard % 3})
    (tmp_path / "classnames.txt").write_text("red\n\n  green \nblue\n")
    ds = ClipBenchmarkWds(tmp_path)
    samples = list(ds)
    assert [s["key"] for s in samples] == ["s0", "s2", "s10"]
    assert [s["label"] for s in samples] == [0, 2, 1]
    assert samples[0]["image"].getpixel((0, 0)) == (1, 2, 3)  # .png wins over .jpg
    assert ds.classnames == ["red", "green", "blue"]  # stripped, blank lines dropped


# ----------------------------------------------------------------------------- errors


def test_missing_classnames_names_file_and_folder(tmp_path):
    root = classification_layout(tmp_path / "pets")
    (root / "classnames.txt").unlink()
    ds = ClipBenchmarkWds(root)  # retrieval-style use needs no class names
    with pytest.raises(EvalDataError, match=r"'.*pets' has no classnames\.txt"):
        _ = ds.classnames


def test_missing_templates_file(tmp_path):
    root = classification_layout(tmp_path)
    (root / "zeroshot_classification_templates.txt").unlink()
    with pytest.raises(EvalDataError, match="has no zeroshot_classification_templates.txt"):
        _ = ClipBenchmarkWds(root).templates


@pytest.mark.parametrize("bad", ["a photo of a dog.", "a {} photo of {c}", "a {c} of {size}", "a {{c}}"])
def test_template_without_placeholder_names_the_line(tmp_path, bad):
    root = classification_layout(tmp_path)
    (root / "zeroshot_classification_templates.txt").write_text(f"a photo of {{c}}.\n\n{bad}\n")
    with pytest.raises(EvalDataError) as err:
        _ = ClipBenchmarkWds(root).templates
    msg = str(err.value)
    assert "zeroshot_classification_templates.txt:3" in msg and repr(bad) in msg and "{c}" in msg


def test_check_templates_accepts_escaped_braces():
    assert check_templates(["{{literal}} {c}"]) == ["{{literal}} {c}"]
    with pytest.raises(EvalDataError, match="no templates"):
        check_templates([])


def test_no_shards(tmp_path):
    (tmp_path / "test").mkdir()
    with pytest.raises(EvalDataError, match=r"no shards in '.*test'"):
        ClipBenchmarkWds(tmp_path)


def test_missing_split_and_missing_root(tmp_path):
    classification_layout(tmp_path)
    with pytest.raises(EvalDataError, match=r"no split folder 'val/'; splits found: \['test'\]"):
        ClipBenchmarkWds(tmp_path, split="val")
    with pytest.raises(EvalDataError, match="does not exist"):
        ClipBenchmarkWds(tmp_path / "nope")


def test_nshards_pointing_at_missing_shard(tmp_path):
    root = classification_layout(tmp_path, n=3, per_shard=3)
    (root / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(EvalDataError, match=r"says 2 shards but .* lacks \['1.tar'\]"):
        ClipBenchmarkWds(root)


def test_empty_shard_yields_nothing(tmp_path):
    write_tar(tmp_path / "test" / "0.tar", [])
    assert list(ClipBenchmarkWds(tmp_path)) == []


def test_truncated_shard_raises(tmp_path):
    root = classification_layout(tmp_path, n=4, per_shard=4)
    shard = root / "test" / "0.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # cut inside the second member
    with pytest.raises(EvalDataError, match=r"0\.tar: .*truncated"):
        list(ClipBenchmarkWds(root))


@pytest.mark.parametrize(
    "kind,match",
    [("retreival", "did you mean 'retrieval'"), ("multilabel", "multi-label datasets .* not supported")],
)
def test_bad_dataset_type(tmp_path, kind, match):
    root = classification_layout(tmp_path)
    (root / "dataset_type.txt").write_text(kind + "\n")
    with pytest.raises(EvalDataError, match=match):
        ClipBenchmarkWds(root)


@pytest.mark.parametrize(
    "members,match",
    [
        ([("a.cls", b"1")], r"sample 'a' has no image \(looked for webp, png, jpg, jpeg; found \['cls'\]\)"),
        ([("a.png", None)], r"sample 'a' has no \.cls member"),
        ([("a.png", None), ("a.cls", b"dog")], r"\.cls must be an integer"),
        ([("a.png", b"not an image"), ("a.cls", b"1")], r"cannot decode \.png"),
    ],
)
def test_bad_samples_name_shard_and_key(tmp_path, members, match):
    image = png_bytes(solid(COLORS[0]))
    write_tar(tmp_path / "test" / "0.tar", [(n, image if d is None else d) for n, d in members])
    with pytest.raises(EvalDataError, match=match) as err:
        list(ClipBenchmarkWds(tmp_path))
    assert "0.tar" in str(err.value)
