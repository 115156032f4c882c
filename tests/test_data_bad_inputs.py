"""Issue #3's list of bad inputs, one test each, through the tools a user meets them with: the builder
counts them, validate names them, the (fast-path) loader counts them and never hangs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from data_helpers import FailingServer, encode, jpeg, photo
from open_clip.transform import PreprocessCfg, image_transform_v2
from test_data_inspect_validate import bomb_png

from clipkit.cli.main import main as cli
from clipkit.config import DataConfig
from clipkit.data import DataError, ShardSpecError, ShardWriter, SkipStats, build_loader
from clipkit.data.build import BuildOptions, build_shards
from clipkit.data.download import Fetcher
from clipkit.data.sources import open_source
from clipkit.data.validate import validate_shards

TRAIN_TF = image_transform_v2(PreprocessCfg(size=32), is_train=True)  # runs on the fast path


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t)] for t in texts])


def skipped(spec: str, **kw) -> dict[str, int]:
    cfg = DataConfig(**{"batch_size": 2, "workers": 0, "shuffle_buffer": 0, **kw})
    stats = SkipStats()
    for batch in build_loader(cfg, spec, TRAIN_TF, tokenize, train=False, seed=0):
        stats.update(batch)
    return dict(stats.by_kind)


def write(folder: Path, samples: list[dict], maxcount: int = 100) -> str:
    with ShardWriter(folder, prefix="s", maxcount=maxcount) as w:
        for s in samples:
            w.write(s)
    return str(folder)


GOOD = [{"__key__": f"g{i}", "jpg": jpeg((96, 64), seed=i), "txt": f"photo {i}"} for i in range(4)]


def test_truncated_tar(tmp_path):
    spec = write(tmp_path, GOOD, maxcount=2)
    shard = tmp_path / "s-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    assert skipped(spec) == {"corrupt_shard": 2}  # sizes.json says how many were lost
    (problem,) = validate_shards(spec).problems
    assert (Path(problem.shard).name, problem.kind) == ("s-000001.tar", "corrupt_shard")


def test_tar_member_with_non_image_bytes(tmp_path):
    spec = write(tmp_path, [*GOOD, {"__key__": "html", "jpg": b"<html>404 not found</html>", "txt": "x"}])
    assert skipped(spec) == {"decode_error": 1}
    (problem,) = validate_shards(spec).problems
    assert (problem.member, problem.kind) == ("html.jpg", "decode_error")


def test_zero_byte_and_decompression_bomb_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"")
    (src / "b.png").write_bytes(bomb_png())
    (src / "c.jpg").write_bytes(jpeg())
    for name in "abc":
        (src / f"{name}.txt").write_text("a caption")
    stats = build_shards(open_source(src)[1], tmp_path / "out", BuildOptions(), source="src")
    assert stats["errors"] == {"empty_image": 1, "image_too_large": 1} and stats["ok"] == 1
    spec = write(tmp_path / "shards", [*GOOD, {"__key__": "z", "jpg": b"", "txt": "x"},
                                       {"__key__": "bomb", "png": bomb_png(), "txt": "x"}])  # fmt: skip
    assert skipped(spec) == {"empty_image": 1, "image_too_large": 1}


def test_missing_empty_and_non_utf8_captions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, caption in [("a", None), ("b", b"  \n"), ("c", "caf\xe9".encode("latin-1")), ("d", b"fine")]:
        (src / f"{name}.jpg").write_bytes(jpeg())
        if caption is not None:
            (src / f"{name}.txt").write_bytes(caption)
    stats = build_shards(open_source(src)[1], tmp_path / "out", BuildOptions(), source="src")
    assert stats["errors"] == {"missing_caption": 1, "empty_caption": 1, "bad_caption_encoding": 1}
    img = encode(photo((64, 48)), "JPEG")
    spec = write(tmp_path / "shards", [*GOOD, {"__key__": "a", "jpg": img}, {"__key__": "b", "jpg": img, "txt": " "},
                                       {"__key__": "c", "jpg": img, "txt": b"\xff\xfe"}])  # fmt: skip
    assert skipped(spec) == {"missing_caption": 1, "empty_caption": 1, "bad_caption_encoding": 1}


def test_manifest_with_a_missing_column(tmp_path, capsys):
    (tmp_path / "m.tsv").write_text("path\tcaption\na.jpg\thello\n")
    args = ["data", "build", str(tmp_path / "m.tsv"), "--image-col", "url", "--caption-col", "caption",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli(args) == 2
    assert "no image column 'url'; its columns are: path, caption" in capsys.readouterr().err


def test_url_that_hangs_is_a_counted_timeout(tmp_path):
    with FailingServer(hang_s=2.0) as srv:
        srv.images["a.jpg"] = jpeg()
        urls = f"{srv.url('hang/a.jpg')}\ta hanging server\n{srv.url('ok/a.jpg')}\ta photo\n"
        (tmp_path / "urls.txt").write_text(urls)
        start = time.monotonic()
        opts = BuildOptions(fetch=Fetcher(timeout=0.3, retries=1, backoff=0.01))
        stats = build_shards(open_source(tmp_path / "urls.txt")[1], tmp_path / "out", opts, source="urls")
    assert stats["errors"] == {"timeout": 1} and stats["ok"] == 1
    assert time.monotonic() - start < 2.0  # 2 attempts x 0.3 s, not the server's 2 s


def test_shard_pattern_that_matches_nothing(tmp_path, capsys):
    spec = str(tmp_path / "train-{000000..000009}.tar")
    with pytest.raises(ShardSpecError, match="matches no existing file"):
        build_loader(DataConfig(), spec, TRAIN_TF, tokenize, train=True, seed=0)
    for command in ("validate", "inspect"):
        assert cli(["data", command, spec]) == 2
        assert "matches no existing file" in capsys.readouterr().err


def test_fewer_shards_than_workers_times_ranks(tmp_path):
    spec = write(tmp_path, GOOD, maxcount=2)  # 2 shards
    start = time.monotonic()
    with pytest.raises(DataError, match=r"2 shard\(s\) for 2 rank\(s\) x 2 loader worker\(s\) = 4 readers"):
        build_loader(DataConfig(workers=2), spec, TRAIN_TF, tokenize, train=True, seed=0, world_size=2)
    assert time.monotonic() - start < 1.0  # raised before any worker starts: no hang
