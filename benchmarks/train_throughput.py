"""Training throughput: clipkit against ``open_clip_train.main`` on the same shards.

Two setups, each trained by both tools with the same model, shards, batch size, optimizer
settings, sample budget and thread counts:

* ``small`` -- a small built-in open_clip model config (default ``ViT-S-32-alt``) trained from
  scratch. Target: clipkit/OpenCLIP samples/s ratio >= 1.0 at equal loss after equal samples.
* ``lit`` -- the demo's LiT setup: locked EfficientNet-Lite0 (bundled ImageNet weights) plus
  all-MiniLM-L6-v2 on the emoji shards; clipkit with its feature cache against
  ``open_clip_train.main --lock-image`` (feature cache cold at the start). Target: >= 5x samples/s over a 10-epoch run, cache
  building included (end-to-end wall time).

OpenCLIP runs in its own virtualenv (``.venv-openclip``, created by
``benchmarks/setup_openclip_env.sh``): open_clip_train crashes with webdataset 1.x
(``KeyError: 'fname'``) and needs webdataset 0.2.86. clipkit runs in the main ``.venv``.

Thread counts are set deliberately and equally for both tools (``--threads`` intra-op threads
in the training process via OMP/MKL env vars and ``torch.set_num_threads``; ``--workers`` data
loader worker processes, each with one torch thread) and printed with the results.

Samples/s is reported two ways:
* ``e2e``: samples trained / wall time of the whole process (start-up, model build, feature
  cache building, data loading, training, final checkpoint). This is the number the targets use.
* ``steady``: batch_size * steps / summed step times, skipping the first ``--skip-steps`` steps
  (from the per-step log lines of each tool).
Beside them, samples per CPU-second (user + sys of the run and its loader workers): the 2 cores
here are shared, and other load inflates wall time far more than CPU time.

The LiT model/optimizer settings (batch size, lr, warmup, locking, context length, ...) are read
from clipkit's recipe ``train/lit_emoji.yaml``; the OpenCLIP run mirrors them
(``--lock-image --lock-image-freeze-bn-stats``, ``--lock-text --lock-text-unlocked-layers N``).

Usage (from the repo root, in the main venv)::

    .venv/bin/python benchmarks/train_throughput.py                      # both setups, both tools
    .venv/bin/python benchmarks/train_throughput.py --setups lit --tools openclip --lit-samples 2048
    .venv/bin/python benchmarks/train_throughput.py --synthetic 2000      # no emoji shards needed

Results are printed as a table and appended, with the command line, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import glob
import io
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
OPENCLIP_ENV = ROOT / ".venv-openclip"
MAIN_ENV = ROOT / ".venv"
RUNNER = BENCH / "_openclip_runner.py"
RESULTS_MD = BENCH / "RESULTS.md"
EMOJI_TRAIN_GLOB = "data/emoji/train/shard-*.tar"  # python -m data_tools.build_emoji --out data/emoji
LIT_RECIPE = ROOT / "train" / "lit_emoji.yaml"
# EfficientNet-Lite (TF ported) normalisation, as timm's tf_efficientnet_lite0 pretrained cfg.
EFFNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFNET_LITE_STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------- settings


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

    @property
    def e2e_sps(self) -> float:
        return self.samples / self.wall_s if self.wall_s and not math.isnan(self.wall_s) else float("nan")

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


# ----------------------------------------------------------------------------- shards


def count_samples(shard: str) -> int:
    """Samples (keys with a caption and an image member) in one tar shard."""
    keys: dict[str, set[str]] = {}
    with tarfile.open(shard) as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = os.path.join(os.path.dirname(m.name), stem)
            keys.setdefault(key, set()).add(ext.lower())
    img = {"jpg", "jpeg", "png", "webp"}
    return sum(1 for exts in keys.values() if "txt" in exts and exts & img)


def make_synthetic_shards(out_dir: Path, n_samples: int, n_shards: int = 4, size: int = 96) -> list[str]:
    """Small webdataset of coloured shapes with matching captions (jpg + txt members)."""
    import random

    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    colours = {
        "red": (220, 30, 30),
        "green": (30, 180, 60),
        "blue": (40, 70, 220),
        "yellow": (240, 210, 30),
        "purple": (140, 50, 170),
        "orange": (250, 140, 20),
        "black": (10, 10, 10),
        "white": (245, 245, 245),
    }
    shapes = ["circle", "square", "triangle", "cross"]
    rng = random.Random(0)
    per = math.ceil(n_samples / n_shards)
    paths = []
    idx = 0
    for s in range(n_shards):
        path = out_dir / f"train-{s:06d}.tar"
        paths.append(str(path))
        if path.exists() and count_samples(str(path)) == min(per, n_samples - s * per):
            idx += min(per, n_samples - s * per)
            continue
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tf:
            for _ in range(min(per, n_samples - s * per)):
                fg, bg = rng.sample(list(colours), 2)
                shape = rng.choice(shapes)
                im = Image.new("RGB", (size, size), colours[bg])
                d = ImageDraw.Draw(im)
                m = size // 5 + rng.randrange(size // 10)
                box = (m, m, size - m, size - m)
                if shape == "circle":
                    d.ellipse(box, fill=colours[fg])
                elif shape == "square":
                    d.rectangle(box, fill=colours[fg])
                elif shape == "triangle":
                    d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=colours[fg])
                else:
                    w = size // 8
                    d.rectangle((size // 2 - w, m, size // 2 + w, size - m), fill=colours[fg])
                    d.rectangle((m, size // 2 - w, size - m, size // 2 + w), fill=colours[fg])
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                members = {"jpg": buf.getvalue(), "txt": f"a {fg} {shape} on a {bg} background".encode()}
                for ext, data in members.items():
                    ti = tarfile.TarInfo(f"{idx:08d}.{ext}")
                    ti.size = len(data)
                    ti.mtime = 0
                    tf.addfile(ti, io.BytesIO(data))
                idx += 1
        os.replace(tmp, path)
    return paths


def private_copy(paths: list[str], dest: Path) -> list[str]:
    """Copy the shards into the benchmark's own folder.

    clipkit keeps its feature cache beside the shards (``<dir>/_clipkit_cache``); a private copy
    lets the benchmark start the clipkit LiT run from a cold cache (cache building included, as
    the target says) without deleting a cache other runs use.
    """
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        q = dest / Path(p).name
        if not q.exists() or q.stat().st_size != Path(p).stat().st_size:
            shutil.copyfile(p, q.with_suffix(".tmp"))
            os.replace(q.with_suffix(".tmp"), q)
        out.append(str(q))
    return out


def clear_feature_cache(shards: list[str]) -> None:
    import shutil

    for d in {Path(s).parent / "_clipkit_cache" for s in shards}:
        if d.exists():
            shutil.rmtree(d)


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


def locate_shards(args: argparse.Namespace) -> list[str]:
    if args.synthetic:
        return make_synthetic_shards(ROOT / ".cache" / "bench_synthetic", args.synthetic)
    pattern = args.shards or EMOJI_TRAIN_GLOB
    paths = sorted(glob.glob(str(ROOT / pattern) if not os.path.isabs(pattern) else pattern))
    if not paths and not args.shards and (ROOT / "data_tools" / "build_emoji.py").exists():
        print(
            "[bench] emoji shards missing; building them: python -m data_tools.build_emoji --out data/emoji",
            flush=True,
        )
        subprocess.run(
            [str(MAIN_ENV / "bin" / "python"), "-m", "data_tools.build_emoji", "--out", "data/emoji"],
            cwd=ROOT,
            check=True,
        )
        paths = sorted(glob.glob(str(ROOT / pattern)))
    if not paths:
        raise SystemExit(
            f"no shards match {pattern!r}; build the emoji shards "
            "(data_tools/build_emoji.py), pass --shards, or use --synthetic N"
        )
    return private_copy(paths, ROOT / args.out / "shards")


# ----------------------------------------------------------------------------- OpenCLIP

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
    py = ensure_openclip_env()
    hp = st.hp
    own = ["--threads", str(st.threads)]
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
    return [rel(py), rel(RUNNER), *own, "--", *train]


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


# ----------------------------------------------------------------------------- clipkit


def yaml_float(x: float) -> str:
    """A float that YAML (1.1, PyYAML) reads back as a float: ``1e-06`` would be a string."""
    text = repr(float(x))
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exp = text.split("e")
        text = f"{mantissa}.0e{exp}"
    return text


def clipkit_overrides(st: Setup, run_dir: Path, run_name: str) -> list[str]:
    """Dotted overrides that make a clipkit run match the OpenCLIP run of the same setup."""
    hp = st.hp
    ov = [
        f"data.train={shard_spec(st.shards)}",
        "data.val=",
        f"data.batch_size={st.batch_size}",
        f"data.workers={st.workers}",
        "data.threads_per_worker=1",
        f"train.samples={st.samples}",
        f"train.seed={hp.seed}",
        f"train.precision={hp.precision}",
        f"train.output_dir={run_dir}",
        f"train.run_name={run_name}",
        "train.log_every=1",  # OpenCLIP logs every step too (--log-every-n-steps 1)
        "train.checkpoint_every=0",  # final checkpoint only, like --save-frequency 0
        f"optim.lr={yaml_float(hp.lr)}",
        f"optim.weight_decay={yaml_float(hp.weight_decay)}",
        f"optim.beta1={yaml_float(hp.beta1)}",
        f"optim.beta2={yaml_float(hp.beta2)}",
        f"optim.eps={yaml_float(hp.eps)}",
        f"optim.warmup_steps={hp.warmup_steps}",
        "optim.min_lr_ratio=0.0",  # OpenCLIP's cosine decays to 0
        f"optim.grad_clip={yaml_float(hp.grad_clip)}",
        "optim.accum_steps=1",
    ]
    if st.name == "small":
        # Both towers from one open_clip config (clipkit builds the model once and splits it);
        # open_clip towers project already, so no extra projection heads.
        ov += [
            f"model.vision.name=open_clip:{st.open_clip_model}",
            f"model.text.name=open_clip:{st.open_clip_model}",
            "model.vision.weights=",
            "model.text.weights=",
            "model.vision.locked=false",
            "model.text.locked=false",
            f"model.vision.image_size={st.small_image_size}",
            f"model.text.context_length={st.small_context_length}",
            "model.vision.augment=true",  # open_clip_train always trains with its train transform
            "model.projection=none",
            "loss.name=clip",
        ]
    return ov + list(st.clipkit_overrides)


def clipkit_recipe(st: Setup) -> str:
    if st.clipkit_recipe:
        return st.clipkit_recipe
    if st.name == "lit":
        return str(LIT_RECIPE.relative_to(ROOT))
    # The small setup is all overrides on top of clipkit's defaults (an empty recipe).
    recipe = ROOT / ".cache" / "bench_empty_recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text("{}\n")
    return str(recipe)


def run_clipkit(st: Setup, out_root: Path, skip_steps: int) -> Result:
    """Train the same setup with clipkit: ``.venv/bin/clipkit train <recipe> key=value ...``.

    Reads per-step loss, samples seen and samples/s from ``<run dir>/metrics.csv``
    (clipkit/training/loop.py logs every step with train.log_every=1).
    """
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out_root / "clipkit"
    name = f"{st.name}-{stamp}"
    clipkit_bin = MAIN_ENV / "bin" / "clipkit"
    recipe = clipkit_recipe(st)
    cmd = [rel(clipkit_bin), "train", rel(recipe), *clipkit_overrides(st, run_dir, name)]
    res = Result(st.name, "clipkit", command=shlex.join(cmd))
    missing = [
        str(p)
        for p in (clipkit_bin, ROOT / "clipkit" / "training" / "loop.py", ROOT / recipe)
        if not Path(p).exists()
    ]
    if missing:
        res.note = f"not run: missing {', '.join(missing)}"
        print(f"[bench] {st.name}/clipkit: skipped -- {res.note}", flush=True)
        return res
    run_dir.mkdir(parents=True, exist_ok=True)
    if not st.warm_cache:
        clear_feature_cache(st.shards)  # cold start: cache building is part of the measured run
    log_path = run_dir / f"{name}.log"
    print(
        f"[bench] {st.name}/clipkit (load avg {load_average()}): {res.command}\n[bench]   log: {log_path}",
        flush=True,
    )
    rc, wall, cpu = run_logged(cmd, log_path, st.threads)
    res.log, res.cpu_s, res.load = str(log_path), cpu, load_average()
    if rc != 0:
        res.note = f"exit {rc}; see {log_path}"
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        return res
    res.wall_s = wall
    res.samples, res.steady_sps, res.final_loss, res.curve = read_clipkit_metrics(run_dir / name, skip_steps)
    return res


def read_clipkit_metrics(run_dir: Path, skip_steps: int) -> tuple[int, float, float, list]:
    """(samples, steady samples/s, mean loss of the last 20 steps, [(samples seen, loss)])."""
    import csv

    path = run_dir / "metrics.csv"
    if not path.exists():
        return 0, float("nan"), float("nan"), []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    curve, times, prev = [], [], 0
    for row in rows:
        seen = int(float(row["samples_seen"]))
        curve.append((seen, float(row["loss"])))
        sps = float(row.get("samples_per_s") or "nan")
        if sps > 0:
            times.append((seen - prev, (seen - prev) / sps))
        prev = seen
    timed = times[skip_steps:]
    steady = sum(n for n, _ in timed) / sum(t for _, t in timed) if timed else float("nan")
    tail = [loss for _, loss in curve[-20:]]
    final = sum(tail) / len(tail) if tail else float("nan")
    return (curve[-1][0] if curve else 0), steady, final, curve


# ----------------------------------------------------------------------------- setups


def lit_settings() -> dict:
    """Model / optimizer / data settings of clipkit's LiT recipe (defaults when not written yet)."""
    sys.path.insert(0, str(ROOT))
    try:
        from clipkit.config import load_config

        if LIT_RECIPE.exists():
            cfg = load_config(LIT_RECIPE)
        else:  # recipe not written yet: clipkit defaults with the demo's locked image tower
            cfg = load_config(None, ["model.vision.locked=true"])
    except Exception as e:  # noqa: BLE001 -- clipkit is being written alongside; fall back to defaults
        print(f"[bench] could not read clipkit's LiT config ({e}); using built-in defaults", flush=True)
        return {}
    o = cfg.optim
    return {
        "batch_size": cfg.data.batch_size,
        "hp": Hparams(
            lr=o.lr,
            weight_decay=o.weight_decay,
            beta1=o.beta1,
            beta2=o.beta2,
            eps=o.eps,
            warmup_steps=o.warmup_steps,
            grad_clip=o.grad_clip,
            seed=cfg.train.seed,
            precision=cfg.train.precision,
        ),
        "embed_dim": cfg.model.embed_dim,
        "image_size": cfg.model.vision.image_size,
        "context_length": cfg.model.text.context_length,
        "lock_image": cfg.model.vision.locked,
        "lock_text": cfg.model.text.locked,
        "text_unlocked_layers": cfg.model.text.unlocked_layers,
        "text_lr_mult": cfg.model.text.lr_mult,
    }


def openclip_epoch_samples(n: int, batch_size: int, workers: int) -> int:
    """Samples open_clip_train trains per epoch for --train-num-samples n: whole batches, the
    same number per loader worker (open_clip_train/data.py get_wds_dataset, one process)."""
    return math.ceil(math.ceil(n / batch_size) / max(1, workers)) * max(1, workers) * batch_size


def build_setups(args: argparse.Namespace, shards: list[str]) -> list[Setup]:
    n_per_pass = sum(count_samples(s) for s in shards)
    if len(shards) < max(1, args.workers):
        raise SystemExit(
            f"{len(shards)} shards < {args.workers} workers (open_clip_train needs >= 1 per worker)"
        )
    out = []
    for name in args.setups.split(","):
        if name == "small":
            bs = args.batch_size or 64
            # Equal samples in both tools: clipkit's budget = what open_clip_train really trains.
            samples = openclip_epoch_samples(args.small_samples, bs, args.workers)
            out.append(
                Setup(
                    "small",
                    shards,
                    n_per_pass,
                    bs,
                    samples,
                    1,
                    Hparams(warmup_steps=args.small_warmup),
                    args.threads,
                    args.workers,
                    open_clip_model=args.small_model,
                    small_image_size=args.small_image_size,
                    small_context_length=args.small_context_length,
                )
            )
        elif name == "lit":
            kw = lit_settings()
            recipe_bs = kw.pop("batch_size", 64)
            bs = args.batch_size or recipe_bs
            if args.lit_samples:
                epochs = 1
                samples = openclip_epoch_samples(args.lit_samples, bs, args.workers)
            else:  # an OpenCLIP "epoch" of n_per_pass samples, rounded up to whole batches per worker
                epochs = args.lit_epochs
                samples = epochs * openclip_epoch_samples(n_per_pass, bs, args.workers)
            out.append(
                Setup(
                    "lit",
                    shards,
                    n_per_pass,
                    bs,
                    samples,
                    epochs,
                    kw.pop("hp", Hparams()),
                    args.threads,
                    args.workers,
                    warm_cache=args.warm_cache,
                    **kw,
                )
            )
        else:
            raise SystemExit(f"unknown setup {name!r} (small, lit)")
    return out


# ----------------------------------------------------------------------------- report


def fmt(x: float, nd: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{nd}f}"


def table(results: list[Result]) -> str:
    by_setup: dict[str, dict[str, Result]] = {}
    for r in results:
        by_setup.setdefault(r.setup, {})[r.tool] = r
    rows = [
        (
            "setup",
            "tool",
            "samples",
            "wall s",
            "samples/s",
            "steady samples/s",
            "CPU s",
            "samples/CPU-s",
            "final loss",
            "ratio",
            "ratio steady",
            "ratio CPU",
            "load avg",
            "note",
        )
    ]

    def ratio(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")

    for setup, tools in by_setup.items():
        oc = tools.get("openclip")
        for tool, r in tools.items():
            rr = [float("nan")] * 3
            if oc is not None and tool == "clipkit":
                rr = [
                    ratio(r.e2e_sps, oc.e2e_sps),
                    ratio(r.steady_sps, oc.steady_sps),
                    ratio(r.cpu_sps, oc.cpu_sps),
                ]
            rows.append(
                (
                    setup,
                    tool,
                    str(r.samples),
                    fmt(r.wall_s, 1),
                    fmt(r.e2e_sps),
                    fmt(r.steady_sps),
                    fmt(r.cpu_s, 0),
                    fmt(r.cpu_sps),
                    fmt(r.final_loss, 4),
                    *(fmt(x) for x in rr),
                    r.load,
                    r.note,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def describe(setups: list[Setup]) -> str:
    import torch

    lines = [
        (
            f"machine: {os.cpu_count()} cpus (shared; load avg now {load_average()}), torch {torch.__version__}, "
            f"python {platform.python_version()}, CPU only (CUDA_VISIBLE_DEVICES='')"
        ),
        (
            "samples/s = samples / wall s of the whole process (start-up, model build, feature cache, "
            "training, final checkpoint); steady = from per-step times after the first "
            "steps; ratio = clipkit / OpenCLIP"
        ),
    ]
    for st in setups:
        model = (
            (
                f"open_clip {st.open_clip_model} from scratch, {st.small_image_size}px, "
                f"ctx {st.small_context_length}"
            )
            if st.name == "small"
            else (
                f"tf_efficientnet_lite0 (locked={st.lock_image}) + MiniLM-L6 (locked={st.lock_text}, "
                f"top {st.text_unlocked_layers} layers trained, lr_mult {st.text_lr_mult} in clipkit only), "
                f"embed {st.embed_dim}, {st.image_size}px, ctx {st.context_length}; clipkit feature cache "
                f"{'warm' if st.warm_cache else 'built in the run'}"
            )
        )
        lines.append(
            f"{st.name}: model {model}; {len(st.shards)} shards, {st.shard_samples} samples/pass; "
            f"batch {st.batch_size}; {st.samples} samples ({st.epochs} epoch(s)); threads {st.threads} "
            f"(OMP/MKL/torch) + {st.workers} loader workers x 1 thread; "
            f"hparams {dataclasses.asdict(st.hp)}"
        )
    return "\n".join(lines)


def append_results(text: str, argv: list[str]) -> None:
    head = (
        ""
        if RESULTS_MD.exists()
        else "# Training throughput results\n\nAppended by benchmarks/train_throughput.py.\n"
    )
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    with open(RESULTS_MD, "a") as f:
        f.write(
            f"{head}\n## {stamp}\n\n```\n{shlex.join(['python', 'benchmarks/train_throughput.py', *argv])}\n```\n\n"
            f"{text}\n"
        )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--setups", default="small,lit", help="comma list of: small, lit")
    p.add_argument("--tools", default="openclip,clipkit", help="comma list of: openclip, clipkit")
    p.add_argument("--shards", default="", help=f"shard glob (default {EMOJI_TRAIN_GLOB}, built if missing)")
    p.add_argument("--synthetic", type=int, default=0, help="use N synthetic samples (4 shards) instead")
    p.add_argument("--batch-size", type=int, default=0, help="default: 64 (small), recipe's (lit)")
    p.add_argument("--small-model", default="ViT-S-32-alt", help="built-in open_clip model config")
    p.add_argument("--small-samples", type=int, default=2048)
    p.add_argument("--small-image-size", type=int, default=128)
    p.add_argument("--small-context-length", type=int, default=32)
    p.add_argument("--small-warmup", type=int, default=10, help="warmup steps of the small setup")
    p.add_argument("--lit-epochs", type=int, default=10)
    p.add_argument(
        "--lit-samples", type=int, default=0, help="fixed LiT sample budget (1 epoch) instead of epochs"
    )
    p.add_argument(
        "--openclip-lit-samples",
        type=int,
        default=0,
        help=(
            "LiT: OpenCLIP trains only this many samples (1 epoch) and its wall time for the full "
            "budget is extrapolated from its steady rate (it has no cache, so every epoch costs the "
            "same); 0 = train the full budget"
        ),
    )
    p.add_argument(
        "--warm-cache", action="store_true", help="LiT: keep clipkit's feature cache (default: cold)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in the training process")
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--skip-steps", type=int, default=3, help="steps left out of the steady-state rate")
    p.add_argument("--out", default="runs/bench", help="run folders and logs")
    p.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS_MD.name}")
    p.add_argument("--json", default="", help="also write results (with loss curves) to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    shards = locate_shards(args)
    setups = build_setups(args, shards)
    out_root = ROOT / args.out
    info = describe(setups)
    print(info, flush=True)
    runners = {"openclip": run_openclip, "clipkit": run_clipkit}
    results = []
    for st in setups:
        for tool in args.tools.split(","):
            if tool == "openclip" and st.name == "lit" and 0 < args.openclip_lit_samples < st.samples:
                results.append(run_openclip_extrapolated(st, out_root / st.name, args))
            else:
                results.append(runners[tool](st, out_root / st.name, args.skip_steps))
            r = results[-1]
            print(
                f"[bench] {st.name}/{tool}: {r.samples} samples, wall {fmt(r.wall_s, 1)} s, "
                f"{fmt(r.e2e_sps)} samples/s e2e, {fmt(r.steady_sps)} steady, loss {fmt(r.final_loss, 4)} "
                f"{r.note}",
                flush=True,
            )
    text = (
        info
        + "\n\n"
        + table(results)
        + "\n\n"
        + "\n".join(f"- {r.setup}/{r.tool}: `{r.command}`" for r in results)
    )
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    failed = [r for r in results if r.note.startswith("exit")]
    if not args.no_record and not failed:
        append_results(text, argv)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
