"""Reliability of a training run: corrupt-checkpoint fallback, full disk, pre-flight, stall
watchdog, non-finite steps, SIGTERM / SIGINT."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from training_helpers import run_training, tiny_tree, write_shards

from clipkit.config import Config, DataConfig, from_dict
from clipkit.errors import ClipkitError
from clipkit.training import checkpoint as ckpt
from clipkit.training import loop
from clipkit.training.safety import preflight_shards
from clipkit.training.sample_log import read_sample_log, sample_log_path

SAMPLES = 96  # 12 steps of 8; 4 shards x 12 samples = 6 steps per epoch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=12, idx=True)


def config(shards: str, out: Path, **overrides) -> Config:
    base = {"train.samples": SAMPLES, "train.checkpoint_every": 3, "train.log_sample_ids": True}
    return from_dict(Config, tiny_tree(shards, out, **{**base, **overrides}))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(ckpt.latest(run_dir))["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return loop.train(config(shards, tmp_path_factory.mktemp("ref"), **{"train.run_name": "ref"}))


class Crash(Exception):
    pass


def crash_after(monkeypatch, steps: int) -> None:
    """The run dies (as if killed) right after optimizer step ``steps``."""
    real = loop.train_step
    done = []

    def step(*args, **kw):
        if len(done) == steps:
            raise Crash
        done.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_step", step)


# ---------------------------------------------------------------------------- checkpoints


def test_corrupt_latest_checkpoint_falls_back_and_still_ends_identical(
    shards, tmp_path, reference, monkeypatch
):
    with monkeypatch.context() as m:
        crash_after(m, 8)  # checkpoints at steps 3 and 6
        with pytest.raises(Crash):
            loop.train(config(shards, tmp_path))
    run_dir = tmp_path / "run"
    latest = ckpt.latest(run_dir)
    assert latest.name == "step_00000006.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the sha256 sees it
    latest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step_00000006.pt is corrupt.*falling back to .*step_00000003.pt"):
        loop.train(config(shards, tmp_path, **{"train.resume": "latest"}))
    assert same(weights(run_dir), weights(reference))  # resumed from step 3, exactly
    assert read_sample_log(sample_log_path(run_dir)) == read_sample_log(sample_log_path(reference))


def test_full_disk_at_a_checkpoint_names_the_path_and_keeps_the_previous(shards, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(
        ckpt.CheckpointError, match=r"cannot write checkpoint .*step_00000006\.pt: .*disk is full"
    ):
        loop.train(config(shards, tmp_path))
    folder = ckpt.checkpoint_dir(tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000003.json", "step_00000003.pt"]
    assert ckpt.latest(tmp_path / "run").name == "step_00000003.pt"


def test_unwritable_or_full_run_folder_fails_before_training(shards, tmp_path, monkeypatch):
    from clipkit.training import safety

    def refuse(path, text):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    with monkeypatch.context() as m:
        m.setattr(safety, "atomic_write_text", refuse)
        with pytest.raises(ClipkitError, match=r"run folder .*run is not writable \(Permission denied\)"):
            loop.train(config(shards, tmp_path))
    with monkeypatch.context() as m:
        m.setattr(safety.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
        with pytest.raises(ClipkitError, match=r"has 0.0 MiB free but one checkpoint needs about"):
            loop.train(config(shards, tmp_path))
    assert not ckpt.list_checkpoints(tmp_path / "run")


# ---------------------------------------------------------------------------- pre-flight


def test_preflight_checks_shard_count_and_readability(tmp_path):
    spec = write_shards(tmp_path / "ok", n_shards=3, per_shard=2)
    with pytest.raises(
        ClipkitError, match=r"3 training shard\(s\) for 2 rank\(s\) x 2 loader worker\(s\) = 4"
    ):
        preflight_shards(DataConfig(train=spec, workers=2), world=2)
    with pytest.warns(UserWarning, match="3 training shards over 2 readers .* is uneven"):
        preflight_shards(DataConfig(train=spec, workers=2), world=1)
    bad = tmp_path / "ok" / "train-000001.tar"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(
        ClipkitError, match=r"1 of 3 training shards are unreadable: '.*train-000001.tar' does not"
    ):
        preflight_shards(DataConfig(train=spec, workers=1, on_error="raise"), world=1)
    with pytest.warns(UserWarning, match="unreadable and will be skipped"):
        preflight_shards(DataConfig(train=spec, workers=1, on_error="skip"), world=1)


# ---------------------------------------------------------------------------- watchdog


def test_watchdog_names_rank_worker_and_shard_of_a_stalled_read(shards, tmp_path, monkeypatch, capfd):
    from clipkit.data import pipeline

    real_open = pipeline.open_url
    stalled = shards.replace("{000000..000003}", "000002")

    def slow_open(url):
        if url == stalled:
            time.sleep(2.5)  # a hung filesystem / network read
        return real_open(url)

    monkeypatch.setattr(pipeline, "open_url", slow_open)  # forked workers inherit it
    overrides = {
        "train.stall_timeout_s": 1.0,
        "data.workers": 2,
        "train.samples": 48,
        "train.feature_cache": False,
    }
    loop.train(config(shards, tmp_path, **overrides))
    err = capfd.readouterr().err
    assert "clipkit watchdog: no batch for" in err
    line = next(x for x in err.splitlines() if "clipkit watchdog" in x)
    assert "rank 0: loader worker" in line and "train-000002.tar" in line, line


# ---------------------------------------------------------------------------- non-finite steps


class NanAt(torch.nn.Module):
    """Wraps the loss: at the given calls the loss is NaN, or its gradient inf (loss finite)."""

    def __init__(self, inner: torch.nn.Module, nan_loss: set[int], inf_grad: set[int]):
        super().__init__()
        self.inner, self.nan_loss, self.inf_grad, self.calls = inner, nan_loss, inf_grad, 0

    def forward(self, out: dict, batch: dict | None = None) -> dict:
        self.calls += 1
        res = dict(self.inner(out, batch))
        if self.calls in self.nan_loss:
            res["loss"] = res["loss"] * float("nan")
        if self.calls in self.inf_grad:
            out["text_emb"].register_hook(lambda g: torch.full_like(g, float("inf")))
        return res


def wrap_loss(monkeypatch, nan_loss: set[int], inf_grad: set[int]) -> None:
    real = loop.build_loss
    monkeypatch.setattr(loop, "build_loss", lambda cfg: NanAt(real(cfg), nan_loss, inf_grad))


def test_nonfinite_steps_are_skipped_without_any_state_change(shards, tmp_path, monkeypatch, capfd):
    wrap_loss(monkeypatch, nan_loss={4}, inf_grad={5})
    real_step, seen = loop.train_step, {}

    def step(run, micro, with_stats):
        before = [p.detach().clone() for p in run.optimizer.param_groups[0]["params"]]
        moments = {k: v["exp_avg"].clone() for k, v in run.optimizer.state.items() if "exp_avg" in v}
        out = real_step(run, micro, with_stats)
        after = [p.detach() for p in run.optimizer.param_groups[0]["params"]]
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and all(
            torch.equal(v, run.optimizer.state[k]["exp_avg"]) for k, v in moments.items()
        )
        seen[run.step + 1] = (out["nonfinite"], unchanged)
        return out

    monkeypatch.setattr(loop, "train_step", step)
    run_dir = loop.train(config(shards, tmp_path))
    assert seen[4] == (1.0, True) and seen[5] == (1.0, True)  # skipped: nothing moved
    assert seen[3] == (0.0, False) and seen[6] == (0.0, False)  # normal steps do update
    err = capfd.readouterr().err
    assert "step 4: non-finite loss nan" in err and "optimizer step skipped (2 in a row" in err
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "nonfinite_steps" and rows[-1].endswith(",2")
    state = ckpt.load(ckpt.latest(run_dir))
    assert state["step"] == 12 and state["nonfinite"] == 2


def test_too_many_nonfinite_steps_in_a_row_stop_keeping_good_checkpoints(shards, tmp_path, monkeypatch):
    wrap_loss(monkeypatch, nan_loss=set(range(5, 100)), inf_grad=set())
    cfg = config(shards, tmp_path, **{"train.max_nonfinite_steps": 3, "train.checkpoint_every": 2})
    with pytest.raises(ClipkitError, match=r"stopping at step 7: 3 steps in a row had a non-finite loss"):
        loop.train(cfg)
    run_dir = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000004.pt", "step_00000006.pt"]
    for path in ckpt.list_checkpoints(run_dir):
        assert all(torch.isfinite(t).all() for t in ckpt.load(path)["model"].values())
    four, six = (ckpt.load(p)["model"] for p in ckpt.list_checkpoints(run_dir))
    assert same(four, six)  # steps 5 and 6 were skipped: the weights did not move


# ---------------------------------------------------------------------------- signals


@pytest.fixture(scope="module")
def forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["training_helpers", "clipkit.training.loop"])
    return ctx


def logged_steps(run_dir: Path) -> int:
    path = sample_log_path(run_dir)
    return max(read_sample_log(path), default=0) if path.is_file() else 0


def run_and_signal(
    ctx,
    tree: dict,
    signals: list[int],
    delay: float,
    log: Path,
    after: int = 2,
    settle: float = 0.0,
    group: bool = False,
):
    """Start a run in a child, send ``signals`` once it logged step ``after`` and ``settle`` seconds
    more have passed; (exit code, run folder). ``group``: the run leads its own process group and
    each signal goes to all of it, loader workers included."""
    proc = ctx.Process(target=run_training, args=(tree, delay, str(log), group))
    proc.start()
    run_dir = Path(tree["train"]["output_dir"]) / tree["train"]["run_name"]
    deadline = time.time() + 60
    while logged_steps(run_dir) < after:
        assert proc.exitcode is None and time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.01)
    time.sleep(settle)
    for sig in signals:
        (os.killpg if group else os.kill)(proc.pid, sig)
        time.sleep(0.1)
    proc.join(60)
    return proc.exitcode, run_dir


def signal_tree(shards: str, out: Path) -> dict:
    return tiny_tree(
        shards, out, **{"train.samples": SAMPLES, "train.checkpoint_every": 3, "train.log_sample_ids": True}
    )


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_at_the_step_boundary_then_exits(
    shards, tmp_path, forkserver, reference, sig, code
):
    log = tmp_path / "stderr.txt"
    exitcode, run_dir = run_and_signal(forkserver, signal_tree(shards, tmp_path), [sig], 0.3, log)
    assert exitcode == code, log.read_text()[-2000:]
    step = logged_steps(run_dir)
    assert 2 <= step < 12 and ckpt.latest(run_dir).name == f"step_{step:08d}.pt"  # the very last step
    text = log.read_text()
    assert f"{signal.Signals(sig).name} received: saving a checkpoint" in text
    assert f"stopped by {signal.Signals(sig).name} after step {step}" in text
    if sig == signal.SIGTERM:  # the preemption checkpoint continues exactly
        loop.train(config(shards, tmp_path, **{"train.resume": "latest"}))
        assert same(weights(run_dir), weights(reference))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_whole_job_still_checkpoints_with_loader_workers(
    shards, tmp_path, forkserver, sig, code
):
    # SLURM (scancel, a time limit), timeout(1), `kill -- -PGID` and Ctrl-C signal every process
    # of the job, the loader workers too. A worker that died of it used to end the run with
    # "DataLoader worker (pid ...) is killed by signal: Terminated" instead of the checkpoint.
    log = tmp_path / "stderr.txt"
    tree = signal_tree(shards, tmp_path)
    tree["data"]["workers"] = 2
    exitcode, run_dir = run_and_signal(forkserver, tree, [sig], 0.3, log, group=True)
    text = log.read_text()
    assert exitcode == code, text[-2000:]
    step = logged_steps(run_dir)
    assert 2 <= step < 12 and ckpt.latest(run_dir).name == f"step_{step:08d}.pt", text[-2000:]
    assert f"stopped by {signal.Signals(sig).name} after step {step}" in text
    assert "killed by signal" not in text


def test_second_signal_exits_at_once(shards, tmp_path, forkserver):
    log = tmp_path / "stderr.txt"
    t0 = time.time()
    tree = signal_tree(shards, tmp_path)
    # Step 1 is logged at its boundary, where a lone first signal would checkpoint and exit within
    # the 0.1 s before the second: wait 0.5 s into step 2's 3 s so both land inside it.
    exitcode, run_dir = run_and_signal(
        forkserver, tree, [signal.SIGTERM, signal.SIGTERM], 3.0, log, after=1, settle=0.5
    )
    assert exitcode == 143 and "second SIGTERM: exiting now" in log.read_text()
    assert time.time() - t0 < 20
    assert not ckpt.list_checkpoints(run_dir)  # gone inside step 2: no checkpoint written
