"""Property-based fuzzing of the loader on hostile tar shards (hypothesis).

Shards are built from random samples (valid or random bytes, wrong or repeated extensions,
empty members), then possibly truncated, bit-flipped, padded with garbage or replaced by
noise. Whatever the input, the loader finishes within a time limit without raising, and the
accounting closes: samples yielded + samples skipped (by kind) == samples in the shard, the
one allowed surplus being a damaged shard whose damage cost no sample (counted once).
"""

from __future__ import annotations

import io
import signal
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms as T

from clipkit.config import DataConfig
from clipkit.data import SkipStats, build_loader
from clipkit.data.shards import write_sizes


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), 120, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


pytestmark = pytest.mark.filterwarnings("ignore:loader worker 0. no usable batch")
PNG = _png()
TRANSFORM = T.Compose([T.Resize((4, 4)), T.ToTensor()])
EXTS = ["png", "txt", "idx", "jpg", "PNG", "bin", "txt.gz", "json"]
CONTENT = {
    "png": st.sampled_from([PNG, PNG[:40], b""]) | st.binary(max_size=64),
    "txt": st.sampled_from([b"a caption", b"", b"  ", b"\xff\xfe bad utf8"]) | st.binary(max_size=32),
    "idx": st.sampled_from([b"7", b"-1", b"x"]) | st.binary(max_size=8),
}
member = st.sampled_from(EXTS).flatmap(
    lambda ext: st.tuples(st.just(ext), CONTENT.get(ext, st.binary(max_size=32)))
)
sample = st.lists(member, min_size=1, max_size=4)
damage = st.one_of(
    st.just(("none", 0, b"")),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(b"")),
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=1200)),
    st.tuples(st.just("noise"), st.just(0), st.binary(max_size=3000)),
)


def tar_bytes(samples: list[list[tuple[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, members in enumerate(samples):
            for ext, data in members:
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def damaged(data: bytes, how: tuple[str, int, bytes]) -> bytes:
    kind, at, extra = how
    if kind == "truncate":
        return data[: at % (len(data) + 1)]
    if kind == "flip":
        at %= len(data)
        return (
            data[:at]
            + bytes(a ^ (b or 1) for a, b in zip(data[at:], extra, strict=False))
            + data[at + len(extra) :]
        )
    if kind == "append":
        return data + extra
    if kind == "noise":
        return extra
    return data


@contextmanager
def time_limit(seconds: int):
    def hung(*_):
        raise TimeoutError(f"the loader did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t)] for t in texts])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples=st.lists(sample, min_size=0, max_size=6), how=damage, workers=st.sampled_from([0, 0, 0, 1]))
def test_loader_survives_and_counts_every_dropped_sample(folder, samples, how, workers):
    shard = folder / "fuzz-000000.tar"
    shard.write_bytes(damaged(tar_bytes(samples), how))
    write_sizes(folder, {shard.name: len(samples)})  # so a damaged shard's lost samples are known
    cfg = DataConfig(batch_size=2, workers=workers, shuffle_buffer=0, on_error="skip")
    stats = SkipStats()
    with time_limit(20):
        for batch in build_loader(cfg, str(shard), TRANSFORM, tokenize, train=False, seed=0):
            stats.update(batch)
            if batch["key"]:  # a batch without keys only carries skip counts
                assert batch["image"].shape[1:] == (3, 4, 4) and len(batch["key"]) == batch["text"].shape[0]
    accounted = stats.seen + stats.total
    if how[0] == "noise":  # not a tar at all: the shard's samples are all counted as lost
        assert accounted >= len(samples)
    elif accounted != len(samples):
        # A damage that cost no sample (e.g. garbage after the last member) still counts once.
        damage_kinds = {"corrupt_shard", "unreadable_shard"}
        assert accounted == len(samples) + 1 and damage_kinds & set(stats.by_kind), (accounted, stats.by_kind)
