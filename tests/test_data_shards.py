"""ShardWriter, atomic writes and the tar reader: whole-or-absent shards, damage always detected."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from clipkit.data.atomic import atomic_open, atomic_write_text
from clipkit.data.shards import ShardWriter, read_sizes, shard_name
from clipkit.data.tario import TarDamaged, iter_samples, iter_tar


def _write(out: Path, n: int, maxcount: int, prefix: str = "shard") -> dict[str, int]:
    with ShardWriter(out, prefix=prefix, maxcount=maxcount) as w:
        for i in range(n):
            w.write({"__key__": f"s{i:04d}", "txt": f"caption {i}", "bin": bytes([i % 256]) * (i + 1)})
    return w.sizes


def _read_all(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return list(iter_samples(f))


# ---------------------------------------------------------------------------- atomic


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "x.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_atomic_open_failure_keeps_old_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write(b"half a checkpoint")
        raise RuntimeError("killed")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# ---------------------------------------------------------------------------- writer


def test_writer_round_trip_sizes_and_contiguous_idx(tmp_path):
    sizes = _write(tmp_path, n=25, maxcount=10)
    assert sizes == {"shard-000000.tar": 10, "shard-000001.tar": 10, "shard-000002.tar": 5}
    assert read_sizes(tmp_path) == sizes
    samples = [s for name in sorted(sizes) for s in _read_all(tmp_path / name)]
    assert [s["__key__"] for s in samples] == [f"s{i:04d}" for i in range(25)]
    assert [int(s["idx"]) for s in samples] == list(range(25))
    assert samples[7]["txt"] == b"caption 7" and samples[7]["bin"] == bytes([7]) * 8
    # Standard tools read the shard too, with the webdataset member naming.
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        assert tf.getnames()[:3] == ["s0000.txt", "s0000.bin", "s0000.idx"]


def test_writer_is_byte_reproducible(tmp_path):
    _write(tmp_path / "a", n=5, maxcount=10)
    _write(tmp_path / "b", n=5, maxcount=10)
    name = "shard-000000.tar"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_writer_rejects_bad_keys_and_members(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write({"__key__": "ok", "txt": "x"})
        with pytest.raises(ValueError, match="contains '.'"):
            w.write({"__key__": "a.b", "txt": "x"})
        with pytest.raises(ValueError, match="duplicate sample key"):
            w.write({"__key__": "ok", "txt": "y"})
        with pytest.raises(ValueError, match="assigned by ShardWriter"):
            w.write({"__key__": "k2", "txt": "y", "idx": "5"})
        with pytest.raises(TypeError, match="must be bytes or str"):
            w.write({"__key__": "k3", "cls": 3})


def test_writer_exception_discards_partial_shard_and_sizes(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, maxcount=4) as w:
        for i in range(6):
            w.write({"__key__": f"k{i}", "txt": "x"})
        raise RuntimeError("source failed")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shard-000000.tar"]  # the finished shard; no partial, no sizes.json
    assert read_sizes(tmp_path) == {}


def test_killed_writer_leaves_no_file_named_like_a_complete_shard(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from clipkit.data.shards import ShardWriter
        w = ShardWriter({str(tmp_path)!r}, prefix="train", maxcount=5)
        for i in range(8):  # shard 0 finished, shard 1 half written
            w.write({{"__key__": f"k{{i}}", "txt": "caption " * 200}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr.decode()
    shards = sorted(p.name for p in tmp_path.glob("train-*.tar"))
    assert shards == ["train-000000.tar"]
    assert len(_read_all(tmp_path / "train-000000.tar")) == 5
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in shards]
    assert len(leftovers) == 1 and leftovers[0].startswith(".train-000001.tar.")  # hidden temp
    assert read_sizes(tmp_path) == {}  # the run never claimed to be complete


def test_rewrite_removes_shards_of_an_earlier_larger_run(tmp_path):
    _write(tmp_path, n=30, maxcount=10, prefix="train")
    _write(tmp_path, n=4, maxcount=10, prefix="val")
    _write(tmp_path, n=12, maxcount=10, prefix="train")
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    ]
    assert read_sizes(tmp_path) == {"train-000000.tar": 10, "train-000001.tar": 2, "val-000000.tar": 4}


def test_clip_benchmark_naming(tmp_path):
    assert shard_name("", 3, digits=0) == "3.tar"
    assert shard_name("train", 3) == "train-000003.tar"
    with ShardWriter(tmp_path, prefix="", maxcount=2, digits=0) as w:
        for i in range(3):
            w.write({"__key__": f"{i:05d}", "cls": "1"})
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"0.tar": 2, "1.tar": 1}


# ---------------------------------------------------------------------------- reader


@pytest.fixture
def shard(tmp_path) -> Path:
    _write(tmp_path, n=6, maxcount=10)
    return tmp_path / "shard-000000.tar"


def _member_offsets(path: Path, data: bool = False) -> list[int]:
    with tarfile.open(path) as tf:
        return [m.offset_data if data else m.offset for m in tf.getmembers()]


def test_reader_detects_truncation_at_a_member_boundary(shard):
    # tarfile's stream mode reads this silently as a short, healthy shard.
    cut = _member_offsets(shard)[9]  # start of sample 3's first header
    shard.write_bytes(shard.read_bytes()[:cut])
    with open(shard, "rb") as f:
        it = iter_samples(f)
        got = [next(it)["__key__"] for _ in range(2)]
        # Sample 2 was being assembled at the damage (it might lack members): dropped.
        with pytest.raises(TarDamaged, match="without the end-of-archive marker"):
            next(it)
    assert got == ["s0000", "s0001"]


def test_reader_detects_truncation_inside_a_member_and_garbage_header(shard):
    data = shard.read_bytes()
    cut = _member_offsets(shard, data=True)[10] + 2  # inside sample 3's 4-byte "bin" member
    with pytest.raises(TarDamaged, match="cut short"):
        list(iter_tar(io.BufferedReader(io.BytesIO(data[:cut]))))
    off = _member_offsets(shard)[11]
    garbage = data[:off] + b"garbage!" * 64 + data[off + 512 :]  # a header overwritten
    with pytest.raises(TarDamaged, match="corrupt tar header"):
        list(iter_tar(io.BytesIO(garbage)))


def test_reader_handles_pax_long_names_gzip_and_skipping(tmp_path):
    long_key = "d/" + "x" * 150
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [
            (f"{long_key}.txt", b"hello"),
            (f"{long_key}.jpg", b"J" * 700),
            ("short.txt", b"x"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path = tmp_path / "a.tar.gz"
    path.write_bytes(gzip.compress(raw))
    with open(path, "rb") as f:
        samples = list(iter_samples(f, want=lambda ext: ext == "txt"))
    assert samples == [{"__key__": long_key, "txt": b"hello"}, {"__key__": "short", "txt": b"x"}]
