"""The OpenCLIP side of benchmarks/train_throughput.py: ``open_clip_train.main`` in its own
virtualenv (through ``_openclip_runner.py``) with the settings of a setup, and its log parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

from _throughput_common import (
    BENCH,
    EFFNET_LITE_MEAN,
    EFFNET_LITE_STD,
    OPENCLIP_ENV,
    ROOT,
    RUNNER,
    Result,
    Setup,
    load_average,
    rel,
    run_logged,
    shard_spec,
)
from _throughput_setups import openclip_epoch_samples

_OC_STEP = re.compile(
    r"\| INFO \| Train Epoch: (?P<epoch>\d+) \[\s*(?P<n>\d+)/(?P<N>\d+) .*?"
    r"Data \(t\): (?P<data>[\d.]+) Batch \(t\): (?P<batch>[\d.]+),.*?\bLoss: (?P<loss>[-\d.eE+naif]+) \("
)


def ensure_openclip_env() -> Path:
    py = OPENCLIP_ENV / "bin" / "python"
    if not (OPENCLIP_ENV / ".clipkit-openclip-env-ok").exists():
        print("[bench] creating .venv-openclip (benchmarks/setup_openclip_env.sh)", flush=True)
        subprocess.run(["bash", str(BENCH / "setup_openclip_env.sh")], check=True)
    return py


def openclip_command(st: Setup, run_dir: Path, run_name: str) -> list[str]:
    """The runner's command line: its own flags, ``--``, then open_clip_train's flags."""
    py = ensure_openclip_env()
    train = training_args(st, run_dir, run_name) + model_args(st)
    return [rel(py), rel(RUNNER), *runner_args(st, run_dir), "--", *train]


def runner_args(st: Setup, run_dir: Path) -> list[str]:
    """Flags of ``_openclip_runner.py`` itself (threads; the LiT model config it writes)."""
    hp = st.hp
    own = ["--threads", str(st.threads)]
    clipkit_cfg = ROOT / "clipkit" / "models" / "open_clip_configs" / f"{st.open_clip_model}.json"
    if st.name == "small" and clipkit_cfg.is_file():  # e.g. clipkit-tiny-ViT: open_clip must know it too
        own += ["--model-config", rel(clipkit_cfg)]
    if st.name == "lit":
        own += [
            "--lit-config-dir",
            str(run_dir / "lit_model"),
            "--embed-dim",
            str(st.embed_dim),
            "--image-size",
            str(st.image_size),
            "--context-length",
            str(st.context_length),
            "--init-seed",
            str(hp.seed),
        ]
    return own


def training_args(st: Setup, run_dir: Path, run_name: str) -> list[str]:
    """open_clip_train's data, schedule, optimizer and logging flags for the setup."""
    hp = st.hp
    train = [
        "--train-data",
        shard_spec(st.shards),
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(st.samples_per_epoch),
        "--epochs",
        str(st.epochs),
        "--batch-size",
        str(st.batch_size),
        "--workers",
        str(st.workers),
        "--device",
        "cpu",
        "--precision",
        "amp_bf16" if hp.precision == "bf16" else "fp32",
        "--lr",
        str(hp.lr),
        "--wd",
        str(hp.weight_decay),
        "--beta1",
        str(hp.beta1),
        "--beta2",
        str(hp.beta2),
        "--eps",
        str(hp.eps),
        "--warmup",
        str(hp.warmup_steps),
        "--seed",
        str(hp.seed),
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",  # final checkpoint only (clipkit also writes checkpoints)
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--logs",
        str(run_dir),
        "--name",
        run_name,
    ]
    if hp.grad_clip:
        train += ["--grad-clip-norm", str(hp.grad_clip)]
    return train


def model_args(st: Setup) -> list[str]:
    """open_clip_train's model flags: a built-in config (small), or the LiT towers' preprocessing
    and locking."""
    train: list[str] = []
    if st.name == "small":
        # open_clip_train's train transform (RandomResizedCrop scale 0.9-1) <-> clipkit augment=true
        train += [
            "--model",
            st.open_clip_model,
            "--force-image-size",
            str(st.small_image_size),
            "--force-context-length",
            str(st.small_context_length),
        ]
    else:
        train += [
            "--image-mean",
            *map(str, EFFNET_LITE_MEAN),
            "--image-std",
            *map(str, EFFNET_LITE_STD),
            "--image-interpolation",
            "bicubic",
        ]
        if st.lock_image:
            # clipkit's locked tower runs in eval mode with BN statistics untouched.
            train += ["--lock-image", "--lock-image-freeze-bn-stats"]
        if st.lock_text:
            train += [
                "--lock-text",
                "--lock-text-freeze-layer-norm",
                "--lock-text-unlocked-layers",
                str(st.text_unlocked_layers),
            ]
    return train


def parse_openclip_log(text: str, batch_size: int, skip_steps: int) -> tuple[int, float, float, list]:
    steps = []
    for line in text.splitlines():
        m = _OC_STEP.search(line)
        if m:
            steps.append((int(m["epoch"]), int(m["n"]), float(m["batch"]), float(m["loss"])))
    curve, seen = [], 0
    for ep, n, bt, loss in steps:
        seen += batch_size
        curve.append((seen, loss))
    timed = [bt for _, _, bt, _ in steps[skip_steps:]]
    steady = batch_size * len(timed) / sum(timed) if timed and sum(timed) > 0 else float("nan")
    tail = [loss for _, loss in curve[-20:]]
    final = sum(tail) / len(tail) if tail else float("nan")
    return seen, steady, final, curve


def run_openclip(st: Setup, out_root: Path, skip_steps: int) -> Result:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out_root / "openclip"
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{st.name}-{stamp}"
    cmd = openclip_command(st, run_dir, name)
    log_path = run_dir / f"{name}.log"
    print(
        f"[bench] {st.name}/openclip (load avg {load_average()}): {shlex.join(cmd)}\n"
        f"[bench]   log: {log_path}",
        flush=True,
    )
    rc, wall, cpu = run_logged(cmd, log_path, st.threads)
    text = log_path.read_text(errors="replace")
    res = Result(
        st.name, "openclip", command=shlex.join(cmd), log=str(log_path), cpu_s=cpu, load=load_average()
    )
    if rc != 0:
        res.note = f"exit {rc}; see {log_path}"
        print(text[-3000:], file=sys.stderr)
        return res
    res.samples, res.steady_sps, res.final_loss, res.curve = parse_openclip_log(
        text, st.batch_size, skip_steps
    )
    res.wall_s = wall
    return res


def run_openclip_extrapolated(st: Setup, out_root: Path, args: argparse.Namespace) -> Result:
    """OpenCLIP on a part of the budget; wall and CPU time for the whole budget extrapolated.

    open_clip_train runs the locked tower on every sample of every epoch, so its cost per
    sample after start-up is constant: the full-budget wall time is the measured run's wall
    time plus the remaining samples at its steady rate (CPU time likewise, per sample).
    """
    part = dataclasses.replace(
        st, samples=openclip_epoch_samples(args.openclip_lit_samples, st.batch_size, st.workers), epochs=1
    )
    res = run_openclip(part, out_root, args.skip_steps)
    if res.note or math.isnan(res.steady_sps) or not res.samples:
        return res
    measured, rest = res.samples, st.samples - res.samples
    res.note = (
        f"extrapolated: measured {measured} samples in {res.wall_s:.1f} s "
        f"({res.cpu_s:.0f} CPU s), + {rest} at the steady {res.steady_sps:.2f}/s"
    )
    res.wall_s += rest / res.steady_sps
    res.cpu_s *= st.samples / measured
    res.samples = st.samples
    res.final_loss = float("nan")  # not comparable: a shorter schedule
    return res
