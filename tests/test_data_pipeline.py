"""build_loader: every sample once per epoch across ranks and workers, determinism, the batch
contract, and each kind of bad input counted (skip) or named (raise)."""

from __future__ import annotations

import io
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.config import DataConfig
from clipkit.data import DataError, ShardSpecError, ShardWriter, SkipStats, build_loader, expand_urls
from clipkit.data.pipeline import draft_size_of
from clipkit.data.shuffle import shuffle_buffer
from clipkit.data.urls import dataset_size

L = 6  # token length of the test tokenizer


def png(value: int, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def transform(img: Image.Image) -> torch.Tensor:
    # (3, 4, 4) in [0, 1]; channel 0 also records the torch thread count seen while decoding.
    x = torch.from_numpy(np.asarray(img.resize((4, 4)), dtype=np.float32) / 255).permute(2, 0, 1).clone()
    x[0, 0, 0] = torch.get_num_threads()
    return x


def tokenize(texts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), L, dtype=torch.int32)  # int32 on purpose: loader must cast
    for i, t in enumerate(texts):
        ids = list(t.encode())[:L]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def write_shards(out: Path, n_shards: int, per_shard: int) -> list[str]:
    with ShardWriter(out, prefix="s", maxcount=per_shard) as w:
        for i in range(n_shards * per_shard):
            w.write({"__key__": f"k{i:04d}", "png": png(i % 256), "txt": f"caption {i}"})
    return [f"k{i:04d}" for i in range(n_shards * per_shard)]


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"batch_size": 4, "workers": 0, "shuffle_buffer": 16, **kw})


def epoch_batches(spec: str, c: DataConfig, **kw) -> list[dict]:
    kw.setdefault("train", False)
    kw.setdefault("seed", 0)
    return list(build_loader(c, spec, transform, tokenize, **kw))


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def skipped(batches: list[dict]) -> dict[str, int]:
    stats = SkipStats()
    for b in batches:
        stats.update(b)
    return dict(stats.by_kind)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[str, list[str]]:
    """8 shards x 12 samples; 12 is a multiple of batch_size 4 so train mode drops nothing."""
    out = tmp_path_factory.mktemp("good")
    keys = write_shards(out, n_shards=8, per_shard=12)
    return str(out / "s-{000000..000007}.tar"), keys


# ---------------------------------------------------------------------------- shard specs


def test_expand_urls_forms(good, tmp_path):
    spec, _ = good
    shards = expand_urls(spec)
    assert len(shards) == 8 and shards[0].endswith("s-000000.tar")
    folder = str(Path(shards[0]).parent)
    assert expand_urls(folder) == shards  # a directory: its *.tar, sorted
    assert expand_urls(f"{shards[0]}::{shards[3]}") == [shards[0], shards[3]]
    assert expand_urls(f"pipe:cat {shards[0]}") == [f"pipe:cat {shards[0]}"]
    assert dataset_size(spec) == 96 and dataset_size(shards[:2]) == 24
    (tmp_path / "x.tar").write_bytes(b"")
    assert dataset_size(str(tmp_path / "x.tar")) is None  # no sizes.json: unknown


def test_pattern_matching_nothing_is_a_clear_error(good, tmp_path):
    with pytest.raises(ShardSpecError, match=r"'.*nope-\{0\.\.3\}\.tar' matches no existing file"):
        expand_urls(str(tmp_path / "nope-{0..3}.tar"))
    spec, _ = good
    with pytest.raises(ShardSpecError, match="2 of 10 shards do not exist"):
        expand_urls(spec.replace("000007", "000009"))
    with pytest.raises(ShardSpecError, match="empty"):
        expand_urls("  ")
    with pytest.raises(ShardSpecError, match="no existing file"):
        build_loader(cfg(), str(tmp_path / "missing.tar"), transform, tokenize, train=False, seed=0)


def test_fewer_shards_than_readers_fails_before_training(good):
    spec, _ = good
    three = "::".join(expand_urls(spec)[:3])
    with pytest.raises(DataError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 loader worker\(s\) = 4 readers"):
        build_loader(cfg(workers=2), three, transform, tokenize, train=True, seed=0, rank=0, world_size=2)
    # Eval tolerates it: idle readers simply get no shards.
    assert len(epoch_batches(three, cfg(workers=2), rank=1, world_size=2)) == 3


# ---------------------------------------------------------------------------- coverage, order


@pytest.mark.parametrize("train", [False, True])
def test_every_sample_exactly_once_across_2_ranks_x_2_workers(good, train):
    spec, keys = good
    c = cfg(workers=2)
    per_rank = [keys_of(epoch_batches(spec, c, train=train, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == keys  # no loss, no duplicate
    assert not set(per_rank[0]) & set(per_rank[1])


def test_eval_is_in_order_and_keeps_the_partial_last_batch(good):
    spec, keys = good
    batches = epoch_batches(spec, cfg(batch_size=5))
    assert keys_of(batches) == keys
    assert [len(b["key"]) for b in batches][-2:] == [5, 1]  # 96 = 19 * 5 + 1


def test_train_drops_partial_batches_only(good):
    spec, keys = good
    batches = epoch_batches(spec, cfg(batch_size=5), train=True)
    assert all(len(b["key"]) == 5 for b in batches) and len(batches) == 19
    assert len(set(keys_of(batches))) == 95 and set(keys_of(batches)) < set(keys)  # 1 left over


def test_train_order_is_deterministic_and_seeded(good):
    spec, keys = good
    c = cfg(workers=2)
    run = [keys_of(epoch_batches(spec, c, train=True, seed=7)) for _ in range(2)]
    assert run[0] == run[1]
    assert sorted(run[0]) == keys and run[0] != keys  # shuffled, complete
    assert keys_of(epoch_batches(spec, c, train=True, seed=8)) != run[0]
    assert keys_of(epoch_batches(spec, c, train=True, seed=7, epoch=1)) != run[0]
    # Without workers the same seed is reproducible too.
    c0 = cfg(workers=0)
    assert keys_of(epoch_batches(spec, c0, train=True, seed=3)) == keys_of(
        epoch_batches(spec, c0, train=True, seed=3)
    )


def test_shard_order_is_shuffled_by_seed_and_epoch(good):
    spec, keys = good
    c = cfg(shuffle_buffer=0)  # buffer off: samples come in whole shards

    def shard_order(**kw) -> list[int]:
        got = keys_of(epoch_batches(spec, c, train=True, **kw))
        blocks = [got[i : i + 12] for i in range(0, 96, 12)]
        assert all(b == keys[int(b[0][1:]) : int(b[0][1:]) + 12] for b in blocks)  # shards intact
        return [int(b[0][1:]) // 12 for b in blocks]

    order = shard_order(seed=1)
    assert sorted(order) == list(range(8)) and order != list(range(8))
    assert shard_order(seed=1) == order
    assert shard_order(seed=2) != order and shard_order(seed=1, epoch=1) != order


def test_shuffle_buffer_is_a_permutation():
    import random

    out = list(shuffle_buffer(range(100), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


# ---------------------------------------------------------------------------- batch contract


def test_batch_dict_contract(good):
    spec, _ = good
    b = epoch_batches(spec, cfg(), train=True)[0]
    assert list(b) == ["image", "text", "key", "idx", "skipped", "stream"]  # stream: train mode only
    assert b["stream"]["worker"] == 0 and b["stream"]["batches"] == 1
    assert b["image"].shape == (4, 3, 4, 4) and b["image"].dtype == torch.float32
    assert b["text"].shape == (4, L) and b["text"].dtype == torch.long
    assert isinstance(b["key"], list) and all(isinstance(k, str) for k in b["key"])
    assert b["idx"].dtype == torch.long and b["idx"].shape == (4,)
    # idx is the writer's contiguous index: k0042 has idx 42.
    assert b["idx"].tolist() == [int(k[1:]) for k in b["key"]]
    assert b["skipped"] == {}
    i = int(b["key"][0][1:])
    assert bytes(b["text"][0].tolist()).rstrip(b"\0") == f"caption {i}".encode()[:L]


def test_threads_per_worker(good):
    spec, _ = good
    for workers in (0, 2):
        before = torch.get_num_threads()
        batches = epoch_batches(spec, cfg(workers=workers, threads_per_worker=1))
        seen = {int(b["image"][j, 0, 0, 0]) for b in batches for j in range(len(b["key"]))}
        assert seen == {1}
        assert torch.get_num_threads() == before  # the model's threads are untouched


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> str:
    """One shard: 4 good samples and one of each bad kind."""
    out = tmp_path_factory.mktemp("bad")
    samples = [
        {"__key__": "good0", "png": png(1), "txt": "fine"},
        {"__key__": "notimage", "png": b"GIF? no, just bytes", "txt": "x"},
        {"__key__": "zerobyte", "png": b"", "txt": "x"},
        {"__key__": "noimage", "txt": "caption without image"},
        {"__key__": "good1", "jpg": png(2), "txt": "fine"},  # member ext != content: PIL sniffs
        {"__key__": "nocaption", "png": png(3)},
        {"__key__": "emptycaption", "png": png(4), "txt": "  \n"},
        {"__key__": "latin1", "png": png(5), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "bomb", "png": _huge_png(), "txt": "x"},
        {"__key__": "good2", "webp": png(6), "txt": "fine"},
        {"__key__": "good3", "png": png(7), "txt": "fine"},
    ]
    with ShardWriter(out, prefix="bad", maxcount=100) as w:
        for s in samples:
            w.write(s)
    return str(out / "bad-000000.tar")


def _huge_png() -> bytes:
    """A PNG header declaring 100,000 x 100,000 pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4))


EXPECTED_BAD = {
    "decode_error": 1,
    "empty_image": 1,
    "missing_image": 1,
    "missing_caption": 1,
    "empty_caption": 1,
    "bad_caption_encoding": 1,
    "image_too_large": 1,
}


def test_skip_mode_counts_each_bad_kind(bad):
    batches = epoch_batches(bad, cfg())
    assert keys_of(batches) == ["good0", "good1", "good2", "good3"]
    assert skipped(batches) == EXPECTED_BAD


@pytest.mark.parametrize("workers", [0, 1])
def test_raise_mode_names_shard_and_key(bad, workers):
    with pytest.raises(DataError, match=r"bad sample 'notimage' in shard '.*bad-000000\.tar': decode_error"):
        epoch_batches(bad, cfg(on_error="raise", workers=workers))


def _truncated_copy(src: str, dst: Path, keep_fraction: float) -> str:
    data = Path(src).read_bytes()
    dst.mkdir(parents=True, exist_ok=True)
    (dst / Path(src).name).write_bytes(data[: int(len(data) * keep_fraction)])
    return str(dst / Path(src).name)


def test_truncated_shard_uses_readable_samples_and_counts_the_rest(good, tmp_path):
    spec, keys = good
    shards = expand_urls(spec)
    # Copy shard 0 cut in half next to a sizes.json that says it held 12 samples.
    shutil.copy(Path(shards[0]).parent / "sizes.json", tmp_path / "sizes.json")
    cut = _truncated_copy(shards[0], tmp_path, 0.5)
    batches = epoch_batches(f"{cut}::{shards[1]}", cfg())
    got = keys_of(batches)
    assert 3 <= len(got) - 12 < 12 and got[-12:] == keys[12:24]  # shard 1 whole after the damage
    assert got[:-12] == keys[: len(got) - 12]  # the readable prefix of shard 0, in order
    assert skipped(batches) == {"corrupt_shard": 24 - len(got)}  # exactly the lost samples
    with pytest.raises(DataError, match=r"shard '.*s-000000\.tar' is damaged after \d+ samples of 12"):
        epoch_batches(cut, cfg(on_error="raise"))


def test_corrupt_shards_never_crash_or_hang_with_workers(good, tmp_path):
    spec, keys = good
    shards = expand_urls(spec)
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 5000)
    cut = _truncated_copy(shards[2], tmp_path / "cut", 0.3)  # no sizes.json: counted once
    spec2 = "::".join([shards[0], str(tmp_path / "empty.tar"), str(tmp_path / "junk.tar"), cut])
    batches = epoch_batches(spec2, cfg(workers=2))
    got = keys_of(batches)
    assert set(keys[:12]) <= set(got) and len(got) < 24
    assert skipped(batches) == {"corrupt_shard": 3}


def test_pipe_urls_are_read(good):
    spec, keys = good
    first = expand_urls(spec)[0]
    batches = epoch_batches(f"pipe:cat {first}", cfg())
    assert keys_of(batches) == keys[:12] and skipped(batches) == {}
    # A failing command yields no sample: it is warned, and a batch without samples carries the count.
    with pytest.warns(UserWarning, match=r"no usable batch .* skipped \{'unreadable_shard': 1\}"):
        (empty,) = epoch_batches(f"pipe:cat {first}.missing", cfg())
    assert empty["key"] == [] and empty["skipped"] == {"unreadable_shard": 1} and "image" not in empty


# ---------------------------------------------------------------------------- feature cache path


class Lookup:
    def __init__(self, keys: list[str], dim: int = 3):
        self.table = {k: np.full(dim, int(k[1:]), np.float32) for k in keys}

    def __contains__(self, key: str) -> bool:
        return key in self.table

    def get(self, key: str) -> np.ndarray:
        return self.table[key]


def test_feature_lookup_replaces_images_without_decoding(good, tmp_path):
    _, keys = good
    # Images here are garbage: a decode would count decode_error, the feature path must not.
    with ShardWriter(tmp_path, prefix="f", maxcount=100) as w:
        for k in keys[:10]:
            w.write({"__key__": k, "jpg": b"not decoded", "txt": "caption"})
    lookup = Lookup(keys[:9])  # the last key has no cached feature
    batches = list(
        build_loader(
            cfg(), str(tmp_path / "f-000000.tar"), None, tokenize, train=False, seed=0, feature_lookup=lookup
        )
    )
    b = batches[0]
    assert list(b) == ["image_features", "text", "key", "idx", "skipped"]
    assert b["image_features"].shape == (4, 3) and b["image_features"].dtype == torch.float32
    assert b["image_features"][:, 0].tolist() == [float(k[1:]) for k in b["key"]]
    assert keys_of(batches) == keys[:9]
    assert skipped(batches) == {"missing_feature": 1}


def test_draft_size_is_inferred_only_for_deterministic_resizes():
    from torchvision import transforms as T

    assert draft_size_of(T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()])) == 224
    assert draft_size_of(T.Compose([T.RandomResizedCrop(224), T.ToTensor()])) is None
    assert draft_size_of(transform) is None


def test_duplicate_member_is_counted(tmp_path):
    import tarfile

    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in [
            ("a.png", png(1)),
            ("a.txt", b"one"),
            ("a.txt", b"two"),
            ("b.png", png(2)),
            ("b.txt", b"ok"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    batches = epoch_batches(str(path), cfg())
    assert keys_of(batches) == ["b"] and skipped(batches) == {"duplicate_member": 1}
    assert batches[0]["idx"].tolist() == [-1]  # no idx member: -1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"on_error": "ignore"}, "data.on_error must be 'skip' or 'raise'"),
        ({"batch_size": 0}, "data.batch_size must be >= 1"),
        ({"workers": -1}, "data.workers must be >= 0"),
    ],
)
def test_bad_settings_fail_before_reading(good, change, message):
    spec, _ = good
    with pytest.raises(ValueError, match=message):
        build_loader(cfg(**change), spec, transform, tokenize, train=False, seed=0)


def _sleep_as_a_worker(ready) -> None:
    from clipkit.data.pipeline import init_worker

    init_worker(1, 0)  # the parent (this test's process) is the loader's main process
    ready.set()
    time.sleep(60)


def test_a_loader_worker_dies_of_the_main_process_sigterm_and_of_no_other():
    # A job-wide SIGTERM (SLURM, timeout(1), kill -- -PGID) must not kill a worker before the
    # main process has checkpointed; the main process's own SIGTERM (torch's terminate(),
    # multiprocessing's exit) still ends it.
    import multiprocessing
    import signal
    import subprocess

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_sleep_as_a_worker, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # another sender
        worker.join(1.5)
        assert worker.is_alive()
        os.kill(worker.pid, signal.SIGTERM)  # the main process
        worker.join(5)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()
