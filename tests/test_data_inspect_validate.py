"""``data inspect`` (numbers + preview grid) and ``data validate`` (full scan, non-zero exit naming each
corrupt shard and member), on shards with every kind of damage the issue lists."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from data_helpers import jpeg, noise_png
from PIL import Image

from clipkit.cli.main import main as cli
from clipkit.data.inspect import inspect_shards
from clipkit.data.shards import ShardWriter
from clipkit.data.validate import validate_shards


def bomb_png() -> bytes:
    """A PNG header declaring 100,000 x 100,000 pixels: refused before any pixel is decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """shard-000000: good; shard-000001: one of each bad sample; shard-000002: cut in half."""
    out = tmp_path_factory.mktemp("val")
    good = jpeg((120, 90), seed=1)
    with ShardWriter(out, prefix="shard", maxcount=7) as w:
        for i in range(7):
            w.write({"__key__": f"g{i}", "jpg": jpeg((120 + 40 * i, 90), seed=i), "txt": f"good photo {i}"})
        bad = [
            {"__key__": "notimage", "jpg": b"<html>this is not an image</html>", "txt": "x"},
            {"__key__": "zerobyte", "jpg": b"", "txt": "x"},
            {"__key__": "bomb", "png": bomb_png(), "txt": "x"},
            {"__key__": "truncjpeg", "jpg": good[: len(good) // 2], "txt": "x"},
            {"__key__": "nocaption", "jpg": good},
            {"__key__": "emptycaption", "jpg": good, "txt": " \n"},
            {"__key__": "latin1", "jpg": good, "txt": "caf\xe9".encode("latin-1")},
        ]
        for s in bad:
            w.write(s)
        for i in range(7):
            w.write({"__key__": f"t{i}", "png": noise_png(seed=i), "txt": f"noise {i}"})
    data = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(data[: len(data) // 2])
    return out


EXPECTED = {
    ("shard-000001.tar", "notimage.jpg", "decode_error"),
    ("shard-000001.tar", "zerobyte.jpg", "empty_image"),
    ("shard-000001.tar", "bomb.png", "image_too_large"),
    ("shard-000001.tar", "truncjpeg.jpg", "decode_error"),
    ("shard-000001.tar", "nocaption.txt", "missing_caption"),
    ("shard-000001.tar", "emptycaption.txt", "empty_caption"),
    ("shard-000001.tar", "latin1.txt", "bad_caption_encoding"),
    ("shard-000002.tar", None, "corrupt_shard"),
}


@pytest.mark.parametrize("workers", [1, 2])
def test_validate_names_each_corrupt_shard_and_member(shards, workers):
    report = validate_shards(str(shards), workers=workers)
    assert {(Path(p.shard).name, p.member, p.kind) for p in report.problems} == EXPECTED
    assert not report.ok and "8 problem(s) in 2 of 3 shards" in report.summary()


def test_validate_cli_exit_codes_and_json(shards, tmp_path, capsys):
    assert cli(["data", "validate", str(shards), "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar: truncjpeg.jpg: decode_error" in out
    assert "shard-000002.tar: corrupt_shard: after" in out
    assert len(json.loads((tmp_path / "r.json").read_text())["problems"]) == 8
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(shards / "shard-000000.tar", good)
    assert cli(["data", "validate", str(good)]) == 0
    assert cli(["data", "validate", str(tmp_path / "nothing-{000000..000003}.tar")]) == 2
    assert "matches no existing file" in capsys.readouterr().err


def test_validate_finds_size_mismatch_missing_shards_and_duplicate_keys(shards, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(shards / "shard-000000.tar", folder / "shard-000000.tar")
    shutil.copy(shards / "shard-000000.tar", folder / "shard-000001.tar")  # same keys again
    (folder / "sizes.json").write_text(
        json.dumps({"shard-000000.tar": 9, "shard-000001.tar": 7, "shard-000002.tar": 7})
    )
    kinds = sorted((Path(p.shard).name, p.kind) for p in validate_shards(str(folder)).problems)
    assert kinds == sorted(
        [("shard-000000.tar", "size_mismatch"), ("shard-000002.tar", "missing_shard")]
        + [("shard-000001.tar", "duplicate_key")] * 7
    )


def test_inspect_counts_histograms_duplicates_and_broken(shards):
    found = inspect_shards(str(shards), preview=4)
    d = found.to_dict()
    readable = found.shards[str(shards / "shard-000002.tar")]  # before the cut
    assert d["shards"] == 3 and d["samples"] == 7 + 7 + readable and 0 < readable < 7
    words = dict(d["caption_words"])
    assert words["2-3"] == 7 + readable and words["1-1"] == 4  # "good photo i", "noise i"; "x"
    sides = dict(d["image_longest_side"])
    assert (sides["128-255"], sides["256-511"], sides[">=4096"]) == (3, 3, 0)  # the bomb: broken, not sized
    assert {p.kind for p in found.broken} == {k for _, _, k in EXPECTED}
    assert len(found.preview) == 4 and found.duplicate_keys == []


def test_inspect_cli_writes_preview_grid_and_json(shards, tmp_path, capsys):
    png, js = tmp_path / "grid.png", tmp_path / "report.json"
    args = ["data", "inspect", str(shards), "--preview", "6", "--preview-out", str(png), "--json", str(js)]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "broken samples: 8" in out and "caption length (words)" in out and "duplicate keys: 0" in out
    img = Image.open(png)
    assert img.format == "PNG" and img.size[0] > 500
    assert json.loads(js.read_text())["broken"]["count"] == 8
