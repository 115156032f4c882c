"""Precision (fp16 with its gradient scaler, bf16), the machine report (system.json: bf16 support
detected, never assumed) and the throughput / peak-memory columns of metrics.csv."""

from __future__ import annotations

import csv
import json
import math
import resource
from pathlib import Path

import pytest
import torch
from torch import nn
from training_helpers import tiny_tree, write_shards

from clipkit import allocator
from clipkit.config import Config, from_dict
from clipkit.errors import ClipkitError
from clipkit.training import checkpoint as ckpt
from clipkit.training import loop, precision, system
from clipkit.training.safety import NonFiniteSteps

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES = 96  # 12 steps of 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=12)


def config(shards: str, out: Path, **overrides) -> Config:
    base = {"train.samples": SAMPLES, "train.checkpoint_every": 3, "train.log_every": 2}
    return from_dict(Config, tiny_tree(shards, out, **{**base, **overrides}))


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(ckpt.latest(run_dir))["model"]


# ---------------------------------------------------------------------------- fp16 on CPU


class AutocastProbe(nn.Module):
    """Records the autocast state its forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_autocast_enabled("cpu"), self.lin(x).dtype))
        return self.lin(x)


@pytest.fixture
def scale_1024(monkeypatch):
    # 2**10: a Linear(4, 4)'s fp16 weight gradient on a batch of 2 ones stays below fp16's 65504
    # (with torch's default 2**16 it overflows on the first step).
    monkeypatch.setattr(precision, "SCALER_KWARGS", {"init_scale": 1024.0})
    yield
    loop.make_accelerator("fp32")  # leave accelerate's process state as the other tests expect


def test_fp16_on_cpu_runs_the_gpu_path_scaler_and_autocast(scale_1024):
    acc = loop.make_accelerator("fp16")
    assert acc.mixed_precision == "fp16" and isinstance(acc.scaler, torch.amp.GradScaler)
    model = AutocastProbe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    out = model(torch.ones(2, 4))
    assert model.seen == [(True, torch.float16)]  # the forward ran under fp16 autocast
    assert out.dtype == torch.float32  # accelerate hands the loss fp32 outputs
    assert opt.scaler is acc.scaler  # the prepared optimizer steps through the scaler
    acc.backward(out.sum())
    assert model.lin.weight.grad.abs().max() == 2 * 1024  # the backward saw the scaled loss
    acc.clip_grad_norm_(model.parameters(), math.inf)  # unscales
    assert model.lin.weight.grad.abs().max() == 2


def test_accelerator_is_not_forced_onto_the_cpu_when_cuda_exists(monkeypatch):
    made = {}

    class FakeAccelerator:
        def __init__(self, **kwargs):
            made.update(kwargs)
            self.mixed_precision, self.scaler = kwargs["mixed_precision"], object()
            self.device = torch.device("cuda", 0)

    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loop, "Accelerator", FakeAccelerator)
    monkeypatch.setattr(precision, "SCALER_KWARGS", {"init_scale": 1024.0})
    acc = loop.make_accelerator("fp16")
    assert made["cpu"] is False and made["mixed_precision"] == "fp16"  # accelerate picks cuda + NCCL
    assert made["kwargs_handlers"][0].init_scale == 1024.0  # the same scaler settings as on CPU
    assert acc.scaler is not None and acc.device.type == "cuda"


def scaled_step(acc, model, opt, inf_grad: bool = False, loss_value: float = 1.0) -> dict[str, bool]:
    out = model(torch.ones(2, 4)).sum() * loss_value
    acc.backward(out)
    if inf_grad:
        model.lin.weight.grad[0, 0] = math.inf
    norm = acc.clip_grad_norm_(model.parameters(), 1.0)
    done = precision.optimizer_step(acc, opt, float(norm), math.isfinite(float(out.detach())), lambda ok: ok)
    opt.zero_grad(set_to_none=True)
    return done


OVERFLOW = {"updated": False, "nonfinite": False, "overflow": True}
BAD = {"updated": False, "nonfinite": True, "overflow": False}
GOOD = {"updated": True, "nonfinite": False, "overflow": False}


def test_optimizer_step_leaves_overflows_to_the_scaler_and_counts_bad_losses(scale_1024):
    acc = loop.make_accelerator("fp16")
    probe = AutocastProbe()
    model, opt = acc.prepare(probe, torch.optim.SGD(probe.parameters(), lr=0.1))
    scale = acc.scaler.get_scale()

    before = model.lin.weight.detach().clone()
    assert scaled_step(acc, model, opt, inf_grad=True) == OVERFLOW
    assert torch.equal(model.lin.weight, before)  # skipped by the scaler
    assert acc.scaler.get_scale() == scale / 2  # ... which lowered its scale

    assert scaled_step(acc, model, opt) == GOOD
    assert not torch.equal(model.lin.weight, before)

    before = model.lin.weight.detach().clone()
    done = scaled_step(acc, model, opt, loss_value=math.nan)  # a NaN loss is a bad step, scaler or not
    assert done == BAD
    assert torch.equal(model.lin.weight, before)
    assert scaled_step(acc, model, opt)["updated"]  # the scaler was reset: the next unscale_ works

    acc.scaler.update(new_scale=0.5)  # below MIN_SCALE, gradients that still overflow are bad
    assert scaled_step(acc, model, opt, inf_grad=True) == BAD


def test_overflow_steps_neither_extend_nor_end_a_bad_streak():
    guard = NonFiniteSteps(limit=2)
    ok = {"nonfinite": 0.0, "overflow": 0.0, "grad_norm": 1.0, "loss": 1.0}
    overflow = {**ok, "overflow": 1.0, "grad_norm": math.inf}
    bad = {**ok, "nonfinite": 1.0, "loss": math.nan}
    for step in range(1, 50):
        assert guard.count(step, overflow, lambda: None) is None
    assert guard.overflows == 49 and guard.total == 0
    assert guard.count(50, bad, lambda: None)
    guard.count(51, overflow, lambda: None)
    with pytest.raises(ClipkitError, match="2 steps in a row"):
        guard.count(52, bad, lambda: None)


@pytest.fixture
def huge_initial_scale(monkeypatch):
    # 2**20: the first 5 steps' fp16 gradients overflow (tiny model) until the scaler has halved
    # its way down to 2**15; the 7 steps after them train.
    monkeypatch.setattr(precision, "SCALER_KWARGS", {"init_scale": 2.0**20})
    yield
    loop.make_accelerator("fp32")


def test_fp16_run_rides_out_overflows_that_would_stop_a_bad_run(shards, tmp_path, huge_initial_scale):
    cfg = config(shards, tmp_path, **{"train.precision": "fp16", "train.max_nonfinite_steps": 2})
    run_dir = loop.train(cfg)
    last = rows(run_dir)[-1]
    skipped = int(last["scaler_skipped_steps"])
    assert 2 < skipped < 12  # more overflows in a row than max_nonfinite_steps, and then training
    assert int(last["nonfinite_steps"]) == 0
    assert float(last["loss_scale"]) == 2.0 ** (20 - skipped)  # halved once per overflow
    state = ckpt.load(ckpt.latest(run_dir))
    assert state["grad_scaler"]["scale"] == float(last["loss_scale"]) and state["scaler_skipped"] == skipped
    assert all(math.isfinite(float(r["loss"])) for r in rows(run_dir))
    system_json = json.loads((run_dir / "system.json").read_text())
    assert system_json["precision"] == "fp16" and system_json["grad_scaler"] == "GradScaler"


class Crash(Exception):
    pass


def test_fp16_resume_restores_the_scaler_bit_exactly(shards, tmp_path, monkeypatch, huge_initial_scale):
    fp16 = {"train.precision": "fp16", "train.max_nonfinite_steps": 2, "train.deterministic": True}
    straight = loop.train(config(shards, tmp_path / "a", **fp16))

    real = loop.train_step

    def dies_after_6(run, micro, with_stats):
        out = real(run, micro, with_stats)
        if run.step + 1 == 6:
            raise Crash
        return out

    monkeypatch.setattr(loop, "train_step", dies_after_6)
    with pytest.raises(Crash):
        loop.train(config(shards, tmp_path / "b", **fp16))
    monkeypatch.setattr(loop, "train_step", real)
    # checkpoint at step 3, inside the overflow streak: a fresh scaler (2**20) would overflow
    # again from there and train different weights
    resumed = loop.train(config(shards, tmp_path / "b", **fp16, **{"train.resume": "latest"}))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows(resumed)[-1]["scaler_skipped_steps"] == rows(straight)[-1]["scaler_skipped_steps"]


class NanLossFrom(nn.Module):
    def __init__(self, inner: nn.Module, first: int):
        super().__init__()
        self.inner, self.first, self.calls = inner, first, 0

    def forward(self, out, batch):
        self.calls += 1
        res = self.inner(out, batch)
        if self.calls >= self.first:
            res["loss"] = res["loss"] * math.nan
        return res


def test_fp16_nan_losses_still_stop_the_run(shards, tmp_path, monkeypatch):
    real = loop.build_loss
    monkeypatch.setattr(loop, "build_loss", lambda cfg: NanLossFrom(real(cfg), first=5))
    cfg = config(shards, tmp_path, **{"train.precision": "fp16", "train.max_nonfinite_steps": 3})
    with pytest.raises(ClipkitError, match=r"stopping at step 7: 3 steps in a row had a non-finite loss"):
        loop.train(cfg)
    loop.make_accelerator("fp32")


# ---------------------------------------------------------------------------- bf16 and the machine


def test_cpu_bf16_support_comes_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: x\n"
    )
    assert system.cpu_flags(str(info)) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    native = system.cpu_info({"avx512f", "avx512_bf16"})
    assert native["bf16_native"] and not native["fp16_native"] and native["flags"] == ["avx512_bf16"]
    assert not system.cpu_info({"avx2", "avx512f"})["bf16_native"]
    assert (
        system.cpu_info({"amx_bf16", "amx_fp16"})["bf16_native"]
        and system.cpu_info({"amx_fp16"})["fp16_native"]
    )
    assert system.cpu_flags(str(tmp_path / "missing")) == set()


def proc_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_bf16_run_reports_the_detected_support_and_trains(shards, tmp_path, capsys):
    fp32 = loop.train(config(shards, tmp_path, **{"train.run_name": "fp32"}))
    run_dir = loop.train(config(shards, tmp_path, **{"train.precision": "bf16", "train.run_name": "bf16"}))
    plan = capsys.readouterr().out
    info = json.loads((run_dir / "system.json").read_text())
    native = bool(proc_flags() & {"avx512_bf16", "amx_bf16"})
    assert info["cpu"]["bf16_native"] is native
    assert info["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["precision"] == "bf16" and info["mixed_precision"] == "bf16" and info["device"] == "cpu"
    assert ("bf16 on this CPU: native" if native else "bf16 on this CPU: emulated") in plan
    assert f"low-precision flags: {', '.join(info['cpu']['flags']) or 'none'}" in plan
    assert info["allocator"] == allocator.state() and f"memory allocator: {allocator.state()}" in plan
    bf16_loss = [float(r["loss"]) for r in rows(run_dir)]
    fp32_loss = [float(r["loss"]) for r in rows(fp32)]
    assert bf16_loss != fp32_loss  # autocast really ran in bf16 ...
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05)  # ... and trains the same model to ~2 digits
    loop.make_accelerator("fp32")


# ---------------------------------------------------------------------------- throughput, memory


def test_metrics_have_throughput_per_rank_and_peak_memory(shards, tmp_path):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    run_dir = loop.train(config(shards, tmp_path))
    table = rows(run_dir)
    assert len(table) == 6
    for r in table:
        rate, per_rank = float(r["samples_per_s"]), float(r["samples_per_s_rank"])
        assert 1 < rate < 1e6 and per_rank == pytest.approx(rate)  # one rank
        peak = float(r["peak_rss_gib"])
        assert start <= peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert "peak_mem_gib" not in table[0]  # a GPU column; on CPU the labelled RSS column
    peaks = [float(r["peak_rss_gib"]) for r in table]
    assert peaks == sorted(peaks)  # a peak since the start never falls


def test_rate_columns_split_the_total_over_ranks():
    assert system.rate_columns(600, 2.0, 4) == {"samples_per_s": 300.0, "samples_per_s_rank": 75.0}
    name, gib = system.peak_memory_gib(torch.device("cpu"))
    assert name == "peak_rss_gib" and gib == pytest.approx(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rel=0.01
    )
