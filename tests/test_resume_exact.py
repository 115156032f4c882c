"""Exact resume: a tiny run SIGKILLed at random steps, resumed each time, ends bit-identical to an
uninterrupted run, and its logged ``idx`` stream shows every sample of every epoch exactly once.

The runs are child processes forked from a forkserver that has already imported clipkit and
torch (a fresh interpreter takes ~6 s to import them; a fork takes milliseconds).
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
from training_helpers import run_training, tiny_tree, write_shards

from clipkit.training import checkpoint as ckpt
from clipkit.training.sample_log import last_step_since_resume, read_sample_log, sample_log_path

N_SHARDS, PER_SHARD, BATCH = 4, 16, 8  # 64 samples per epoch; 2 workers read 32 each
SAMPLES = 200  # 3 epochs + 8 samples
STEPS = 25
KILLS = 3  # at random steps, plus one during a checkpoint write


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=N_SHARDS, per_shard=PER_SHARD, idx=True)


@pytest.fixture(scope="module")
def forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["training_helpers", "clipkit.training.loop"])
    return ctx


def tree_of(shards: str, out: Path, name: str, workers: int, **extra) -> dict:
    return tiny_tree(
        shards,
        out,
        **{
            "train.samples": SAMPLES,
            "train.run_name": name,
            "train.checkpoint_every": 3,
            "train.log_every": 5,
            "train.deterministic": True,
            "train.log_sample_ids": True,
            "data.workers": workers,
            "data.batch_size": BATCH,
            **extra,
        },
    )


def start(ctx, cfg_tree: dict, delay: float = 0.0):
    proc = ctx.Process(target=run_training, args=(cfg_tree, delay))
    proc.start()
    return proc


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    state = ckpt.load(ckpt.latest(run_dir))
    assert state["step"] == STEPS and state["samples_seen"] == SAMPLES
    return state["model"]


def replays_agree(path: Path) -> None:
    """Every step logged more than once (replayed after a resume) trained the same samples."""
    first: dict[int, str] = {}
    for line in path.read_text().split("\n"):
        if line.endswith(" $"):
            step, body = line.split(" ", 1)
            assert first.setdefault(int(step), body) == body, f"step {step} replayed with other samples"


def check_epochs(log: dict[int, list[tuple[int, list[int]]]]) -> None:
    assert sorted(log) == list(range(1, STEPS + 1))
    seen: dict[int, list[int]] = {}
    for step in sorted(log):
        for epoch, idx in log[step]:
            seen.setdefault(epoch, []).extend(idx)
    assert sum(len(v) for v in seen.values()) == SAMPLES  # the budget, exactly
    every = list(range(N_SHARDS * PER_SHARD))
    for epoch, idx in seen.items():
        assert len(idx) == len(set(idx)), f"epoch {epoch}: a sample was trained twice"
        if epoch < max(seen):
            assert sorted(idx) == every, f"epoch {epoch}: samples skipped"
        else:
            assert set(idx) <= set(every)


# workers=0 trains on cached features of the locked vision tower; workers=2 decodes the images
# with random-crop augmentation in two loader processes.
PATHS = {0: {}, 2: {"train.feature_cache": False, "model.vision.augment": True}}


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_at_random_steps_resumes_bit_identical(shards, forkserver, tmp_path, workers):
    def tree(*args, **extra) -> dict:
        return tree_of(*args, **PATHS[workers], **extra)

    ref = start(forkserver, tree(shards, tmp_path, "reference", workers))
    ref.join(120)
    assert ref.exitcode == 0

    run_dir = tmp_path / "killed"
    resume = tree(shards, tmp_path, "killed", workers, **{"train.resume": "latest"})
    # KILLS random steps, then once while a checkpoint is being written (None).
    targets = [*sorted(random.Random(workers).sample(range(2, STEPS - 4), KILLS)), None]
    proc = start(forkserver, tree(shards, tmp_path, "killed", workers), delay=0.03)
    for target in targets:
        deadline = time.time() + 60
        while not (
            ckpt.write_in_progress(run_dir)
            if target is None
            else last_step_since_resume(sample_log_path(run_dir)) >= target
        ):
            assert proc.exitcode is None, f"run ended (exit {proc.exitcode}) before the kill at {target}"
            assert time.time() < deadline, f"kill point {target} not reached in 60 s"
            time.sleep(0.001)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.join()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt.latest(run_dir)
        # At most a checkpoint caught mid-write (no sidecar yet); never a damaged complete one.
        assert all("has no sidecar" in str(w.message) for w in caught), [str(w.message) for w in caught]
        proc = start(forkserver, resume, delay=0.03)
    proc.join(120)
    assert proc.exitcode == 0
    assert sample_log_path(run_dir).read_text().count("# resume") == KILLS + 1

    want, got = final_model(tmp_path / "reference"), final_model(run_dir)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key  # bit for bit
    replays_agree(sample_log_path(run_dir))
    log = read_sample_log(sample_log_path(run_dir))
    assert log == read_sample_log(sample_log_path(tmp_path / "reference"))
    check_epochs(log)


# ---------------------------------------------------------------------------- the stream alone


def stream_shards(folder: Path) -> str:
    """4 shards x 10 samples of 12 px PNGs with idx; every 7th image is garbage (a counted skip)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(4):
        with wds.TarWriter(str(folder / f"s-{s}.tar")) as sink:
            for i in range(10):
                n = s * 10 + i
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
                image = b"not a png" if n % 7 == 3 else buf.getvalue()
                sink.write({"__key__": f"k{n:03d}", "png": image, "txt": f"caption {n}", "idx": str(n)})
    return str(folder / "s-{0..3}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_state_continues_with_the_same_batches_across_epochs(tmp_path, workers):
    from torchvision import transforms as T

    from clipkit.config import DataConfig
    from clipkit.data import build_loader
    from clipkit.training.stream import TrainStream

    spec = stream_shards(tmp_path / "shards")
    cfg = DataConfig(batch_size=3, workers=workers, shuffle_buffer=5)
    augment = T.Compose([T.RandomResizedCrop(8), T.ToTensor()])  # random crops: seeded per sample

    def tokenize(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), hash(t) % 1000] for t in texts])

    def stream() -> TrainStream:
        def make(seed: int, epoch: int, resume: dict | None):
            return build_loader(
                cfg, spec, augment, tokenize, train=True, seed=seed, epoch=epoch, resume=resume
            )

        return TrainStream(make, cfg.batch_size, seed=1)

    total = 26  # ~2.6 epochs of ~10 full batches
    whole = stream()
    want = [whole.next_batch() for _ in range(total)]
    for cut in (1, 4, 11, 19):  # mid-epoch, first epoch, second epoch (some workers done)
        first = stream()
        for _ in range(cut):
            first.next_batch()
        state = first.state_dict()
        again = stream()
        again.load_state_dict(state)
        for i in range(cut, total):
            got, ref = again.next_batch(), want[i]
            assert got["key"] == ref["key"], (cut, i)
            assert torch.equal(got["image"], ref["image"]) and torch.equal(got["idx"], ref["idx"])
        assert again.epoch == whole.epoch
    assert sum(whole.skip.by_kind.values()) > 0  # the garbage images were skipped and counted


def test_the_next_pass_opens_before_the_current_one_ends_with_the_same_batches(tmp_path):
    """With loader workers the stream makes the next pass's loader while the current pass still
    has batches (its workers start meanwhile); the batches equal those of a stream that opens
    each pass only when the last one has ended."""
    from torchvision import transforms as T

    from clipkit.config import DataConfig
    from clipkit.data import build_loader
    from clipkit.training.stream import TrainStream

    spec = stream_shards(tmp_path / "shards")
    cfg = DataConfig(batch_size=3, workers=2, shuffle_buffer=5)
    to_tensor = T.Compose([T.Resize(8), T.ToTensor()])

    def tokenize(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), hash(t) % 1000] for t in texts])

    def run(ahead: bool) -> tuple[list[dict], list[int], dict[int, int]]:
        batches: list[dict] = []
        made: dict[int, int] = {}  # epoch -> batches returned when its loader was made

        def make(seed: int, epoch: int, resume: dict | None):
            made[epoch] = len(batches)
            return build_loader(
                cfg, spec, to_tensor, tokenize, train=True, seed=seed, epoch=epoch, resume=resume
            )

        s = TrainStream(make, cfg.batch_size, seed=1, open_ahead=ahead)
        epochs = []
        for _ in range(26):  # ~2.6 passes of ~10 full batches
            batches.append(s.next_batch())
            epochs.append(s.epoch)
        s.close()
        return batches, epochs, made

    (late, late_epochs, late_made), (early, early_epochs, early_made) = run(False), run(True)
    assert late_epochs == early_epochs and max(early_epochs) == 2
    for a, b in zip(late, early):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    first = {e: early_epochs.index(e) for e in (1, 2)}  # the index of each pass's first batch
    for e in (1, 2):
        assert late_made[e] == first[e]  # made when its first batch was asked for
        assert early_made[e] < first[e]  # made while the previous pass still had batches
