"""Shared pieces of benchmarks/train_throughput.py: paths, the setup/result records, and how a
tool's run is started (thread counts, offline environment, wall and CPU time).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
OPENCLIP_ENV = ROOT / ".venv-openclip"
MAIN_ENV = ROOT / ".venv"
RUNNER = BENCH / "_openclip_runner.py"
EMOJI_TRAIN_GLOB = "data/emoji/train/shard-*.tar"  # python -m data_tools.build_emoji --out data/emoji
LIT_RECIPE = ROOT / "train" / "lit_emoji.yaml"
# EfficientNet-Lite (TF ported) normalisation, as timm's tf_efficientnet_lite0 pretrained cfg.
EFFNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFNET_LITE_STD = (0.5, 0.5, 0.5)


@dataclass
class Hparams:
    """Optimizer/schedule settings shared by both tools (clipkit names; mapped for OpenCLIP)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"


@dataclass
class Setup:
    name: str  # "small" or "lit"
    shards: list[str]
    shard_samples: int  # samples in one pass over `shards`
    batch_size: int
    samples: int  # sample budget (epochs * shard_samples for the LiT run)
    epochs: int  # OpenCLIP epochs; samples_per_epoch = samples / epochs
    hp: Hparams
    threads: int
    workers: int
    # small setup: a built-in open_clip config, image side / context length forced equally in
    # both tools (open_clip's force_image_size / force_context_length; clipkit's
    # model.vision.image_size / model.text.context_length on its open_clip: towers)
    open_clip_model: str = "ViT-S-32-alt"
    small_image_size: int = 128
    small_context_length: int = 32
    # lit setup
    embed_dim: int = 256
    image_size: int = 224
    context_length: int = 64
    lock_image: bool = True
    lock_text: bool = False
    text_unlocked_layers: int = 0
    text_lr_mult: float = 1.0  # clipkit only: open_clip_train has no per-tower learning rate
    warm_cache: bool = False  # keep clipkit's feature cache from an earlier run
    clipkit_recipe: str = ""
    clipkit_overrides: list[str] = field(default_factory=list)

    @property
    def samples_per_epoch(self) -> int:
        return self.samples // self.epochs


@dataclass
class Result:
    setup: str
    tool: str
    samples: int = 0
    wall_s: float = float("nan")
    steady_sps: float = float("nan")
    final_loss: float = float("nan")
    command: str = ""
    log: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)  # (samples seen, step loss)
    cpu_s: float = float("nan")  # user + sys CPU seconds of the run and its loader workers
    load: str = ""  # 1/5/15-minute load average when the run ended
    note: str = ""
    seed: int = 0

    @property
    def e2e_sps(self) -> float:
        return self.samples / self.wall_s if self.wall_s and not math.isnan(self.wall_s) else float("nan")

    def tail_loss(self, frac: float = 0.25) -> float:
        """Mean step loss over the last ``frac`` of the steps: the level the curve ends at, with
        less of one batch's noise than the final step's loss."""
        losses = [loss for _, loss in self.curve]
        if not losses:
            return float("nan")
        tail = losses[-max(1, round(len(losses) * frac)) :]
        return sum(tail) / len(tail)

    @property
    def cpu_sps(self) -> float:
        """Samples per CPU-second: less sensitive than wall time to other load on the machine."""
        return self.samples / self.cpu_s if self.samples and self.cpu_s > 0 else float("nan")


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    # Never reach a hub: weights and tokenizers come from installed packages.
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, for both tools
    return env


def rel(path: str | Path) -> str:
    """``path`` relative to the repo root (both tools run there), else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT)) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def shard_spec(paths: list[str]) -> str:
    """One shard URL spec both tools read: a brace range when the shards are consecutively
    numbered in one folder (``dir/shard-{000000..000007}.tar``), else a ``::``-joined list."""
    paths = [rel(p) for p in paths]
    m = [re.fullmatch(r"(.*?)(\d+)(\.tar)", p) for p in paths]
    if len(paths) > 1 and all(m):
        heads = {x[1] for x in m} | {x[3] for x in m}
        nums = [x[2] for x in m]
        width = {len(n) for n in nums}
        ints = [int(n) for n in nums]
        if len(heads) == 2 and len(width) == 1 and ints == list(range(ints[0], ints[0] + len(ints))):
            return f"{m[0][1]}{{{nums[0]}..{nums[-1]}}}{m[0][3]}"
    return "::".join(paths)


def run_logged(cmd: list[str], log_path: Path, threads: int) -> tuple[int, float, float]:
    """Run ``cmd`` (output to ``log_path``); returns (exit code, wall s, CPU s of it and its children).

    CPU seconds (user + sys of the process and its reaped descendants: loader workers included)
    are reported beside wall time because this machine's 2 cores are shared: under contention
    wall time grows, CPU time much less.
    """
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=thread_env(threads), stdout=log, stderr=subprocess.STDOUT, check=False
        )
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.returncode, wall, cpu


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"
