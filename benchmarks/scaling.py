"""Data-parallel scaling on this machine: one recipe, one global batch, 1 and 2 processes; clipkit
beside OpenCLIP's trainer (``open_clip_train``, ``--dist-backend gloo``) in the same run.

    .venv/bin/python benchmarks/scaling.py                          # small model, both tools
    .venv/bin/python benchmarks/scaling.py --model tiny --epochs 1 --epoch-batches 4   # smoke
    .venv/bin/python benchmarks/scaling.py --record                 # + a section in RESULTS.md

Method. Synthetic shards of G/2 samples each (G = ``--global-batch``), ``2 * --epoch-batches``
of them, read for ``--epochs`` passes. Both tools train the same open_clip model from random
init (``--model``: ``small`` = ViT-S-32-alt at 128 px and 32 tokens, ``tiny`` = clipkit's
``clipkit-tiny-ViT`` at 32 px and 16 tokens), clip loss, fp32, with the same optimizer settings
and random-crop augmentation, one torch thread per process and the loader in the training
process (``--workers 0``) unless told otherwise:

* clipkit, 1 process: ``clipkit train`` with ``data.batch_size=G``;
* clipkit, 2 processes: ``torchrun --standalone --nproc-per-node 2 -m clipkit.cli.main train``
  with ``data.batch_size=G/2`` (gloo on the CPU);
* OpenCLIP, 1 and 2 processes: ``open_clip_train.main`` in ``.venv-openclip`` (see
  ``setup_openclip_env.sh``), ``--batch-size`` G and G/2 per process, ``--device cpu``, the 2-process
  run under that environment's torchrun with ``--dist-backend gloo``.

Both clipkit runs are deterministic, with the sample shuffle buffer off: rank r's k-th batch is
shard 2k + r of the pass, so the global batch of every step is the 1-process run's batch (as in
``tests/test_train_ddp.py``), and the final weights must agree within 1e-5.

Reported per run: samples/s steady (from the per-step logs, the first ``--skip-steps`` steps of
each run left out) and end to end (samples / wall time of the whole command), CPU seconds, the
load average when it ended; per tool the scaling efficiency, steady samples/s of 2 processes over
twice that of 1 (a figure, no target: on 2 shared cores it measures contention as much as
clipkit); and the largest weight difference between clipkit's 1- and 2-process runs (target
<= 1e-5). Exit 1 when a run fails or the target is missed. The report goes to stdout and
runs/bench/scaling/; RESULTS.md is written only with ``--record``. The load average is printed at
the start and the end.
"""

from __future__ import annotations

import argparse
import io
import math
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the sibling helper modules, however this file was loaded
    sys.path.insert(0, _HERE)

import _record
from _throughput_clipkit import clipkit_overrides, clipkit_recipe, read_clipkit_metrics
from _throughput_common import (
    MAIN_ENV,
    OPENCLIP_ENV,
    ROOT,
    RUNNER,
    Hparams,
    Setup,
    load_average,
    rel,
    run_logged,
)
from _throughput_openclip import ensure_openclip_env, model_args, parse_openclip_log, training_args

# --model -> (open_clip config, image size, context length, embedding width)
MODELS = {"small": ("ViT-S-32-alt", 128, 32, 256), "tiny": ("clipkit-tiny-ViT", 32, 16, 32)}
TINY_JSON = ROOT / "clipkit" / "models" / "open_clip_configs" / "clipkit-tiny-ViT.json"
WEIGHT_TOL = 1e-5
WORDS = ["red", "green", "blue", "cat", "dog", "bird", "small", "large", "happy", "sad", "tree", "sun"]


@dataclass
class Row:
    tool: str
    procs: int
    samples: int = 0
    wall_s: float = math.nan
    steady_sps: float = math.nan
    cpu_s: float = math.nan
    load: str = ""
    command: str = ""
    note: str = ""

    @property
    def e2e_sps(self) -> float:
        return self.samples / self.wall_s if self.samples and self.wall_s > 0 else math.nan


def write_shards(folder: Path, n_shards: int, per_shard: int, size: int) -> list[str]:
    """``n_shards`` shards of ``per_shard`` JPEGs (smooth random colours, ``size`` px) + captions."""
    import numpy as np
    from PIL import Image

    from clipkit.data import ShardWriter

    if folder.is_dir() and len(sorted(folder.glob("*.tar"))) == n_shards:
        return [str(p) for p in sorted(folder.glob("*.tar"))]
    rng = np.random.default_rng(0)
    with ShardWriter(folder, prefix="scaling", maxcount=per_shard) as writer:
        for i in range(n_shards * per_shard):
            small = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
            buf = io.BytesIO()
            small.resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=90)
            writer.write(
                {"__key__": f"s{i:07d}", "jpg": buf.getvalue(), "txt": " ".join(rng.choice(WORDS, 4))}
            )
    return [str(p) for p in sorted(folder.glob("*.tar"))]


def setup_for(args: argparse.Namespace, shards: list[str], procs: int) -> Setup:
    """The throughput benchmark's "small" setup record, one process's share of the global batch."""
    name, image_size, context, _ = MODELS[args.model]
    steps = args.epochs * args.epoch_batches
    hp = Hparams(lr=args.lr, warmup_steps=args.warmup, grad_clip=1.0, seed=0, precision="fp32")
    return Setup(
        "small", shards, len(shards) * args.global_batch // 2, args.global_batch // procs,
        steps * args.global_batch, args.epochs, hp, args.threads, args.workers,
        open_clip_model=name, small_image_size=image_size, small_context_length=context,
    )  # fmt: skip


def clipkit_command(st: Setup, procs: int, run_dir: Path, name: str) -> list[str]:
    overrides = clipkit_overrides(st, run_dir, name) + [
        "data.shuffle_buffer=0",  # the same global batch at every step (see the module docstring)
        "train.deterministic=true",
        f"train.threads={st.threads}",
        f"model.embed_dim={next(m[3] for m in MODELS.values() if m[0] == st.open_clip_model)}",
    ]
    recipe = rel(clipkit_recipe(st))
    if procs == 1:
        return [rel(MAIN_ENV / "bin" / "clipkit"), "train", recipe, *overrides]
    launch = [rel(MAIN_ENV / "bin" / "torchrun"), "--standalone", "--nproc-per-node", str(procs)]
    return [*launch, "-m", "clipkit.cli.main", "train", recipe, *overrides]


def openclip_command(st: Setup, procs: int, run_dir: Path, name: str) -> list[str]:
    py = ensure_openclip_env()
    own = ["--threads", str(st.threads)]
    if st.open_clip_model == MODELS["tiny"][0]:
        own += ["--model-config", rel(TINY_JSON)]
    train = [*training_args(st, run_dir, name), *model_args(st), "--dist-backend", "gloo"]
    if procs == 1:
        return [rel(py), rel(RUNNER), *own, "--", *train]
    launch = [rel(OPENCLIP_ENV / "bin" / "torchrun"), "--standalone", "--nproc-per-node", str(procs)]
    return [*launch, rel(RUNNER), *own, "--", *train]


def run(tool: str, st: Setup, procs: int, out: Path, skip: int) -> tuple[Row, Path]:
    """One run: its row and its run folder (clipkit) or log (OpenCLIP)."""
    name = f"{tool}-{procs}p"
    run_dir = out / tool
    run_dir.mkdir(parents=True, exist_ok=True)
    make = clipkit_command if tool == "clipkit" else openclip_command
    cmd = make(st, procs, run_dir, name)
    log = run_dir / f"{name}.log"
    print(
        f"[scaling] {name} (load avg {load_average()}): {shlex.join(cmd)}\n[scaling]   log: {log}", flush=True
    )
    rc, wall, cpu = run_logged(cmd, log, st.threads)
    row = Row(tool, procs, wall_s=wall, cpu_s=cpu, load=load_average(), command=shlex.join(cmd))
    if rc != 0:
        row.note = f"exit {rc}; see {log}"
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        return row, log
    if tool == "clipkit":
        row.samples, row.steady_sps, _, _ = read_clipkit_metrics(run_dir / name, skip)
        return row, run_dir / name
    seen, row.steady_sps, _, _ = parse_openclip_log(
        log.read_text(errors="replace"), st.batch_size * procs, skip
    )
    row.samples = seen
    return row, log


def max_weight_difference(one: Path, two: Path) -> tuple[float, str]:
    from clipkit.training import checkpoint as ckpt

    a, b = (ckpt.load(ckpt.latest(d))["model"] for d in (one, two))
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:,.{digits}f}"


def report(rows: list[Row], diff: tuple[float, str] | None, args: argparse.Namespace) -> tuple[str, bool]:
    """(the results as text, whether every target was met)."""
    lines = [
        (
            f"model {args.model} ({MODELS[args.model][0]}), global batch {args.global_batch}, "
            f"{args.epochs * args.epoch_batches} steps, fp32, {args.threads} torch thread(s) and "
            f"{args.workers} loader worker(s) per process, CPU, gloo"
        ),
        "",
        "| tool | processes | samples | wall s | samples/s e2e | samples/s steady | CPU s | load avg | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tool} | {r.procs} | {r.samples} | {fmt(r.wall_s)} | {fmt(r.e2e_sps)} | "
            f"{fmt(r.steady_sps)} | {fmt(r.cpu_s, 0)} | {r.load} | {r.note} |"
        )
    lines.append("")
    ok = not any(r.note for r in rows)
    for tool in dict.fromkeys(r.tool for r in rows):
        by = {r.procs: r for r in rows if r.tool == tool}
        if 1 in by and 2 in by:
            eff = by[2].steady_sps / (2 * by[1].steady_sps)
            lines.append(
                f"- {tool}: scaling efficiency 1 -> 2 processes {fmt(100 * eff)} % (steady samples/s)"
            )
    if diff is not None:
        verdicts = _record.Targets()
        lines.append(
            "- clipkit: "
            + verdicts.check(
                f"largest weight difference 1 vs 2 processes <= {WEIGHT_TOL:.0e}",
                diff[0] <= WEIGHT_TOL,
                f"{diff[0]:.2e}, {diff[1]}",
            )
        )
        ok = ok and verdicts.exit_code() == 0
    lines += ["", *(f"- {r.tool} {r.procs}p: `{r.command}`" for r in rows)]
    return "\n".join(lines), ok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--global-batch", type=int, default=32, help="samples per step, all processes (even)")
    p.add_argument("--epoch-batches", type=int, default=8, help="steps per pass over the shards")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=4, help="warmup steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes per process")
    p.add_argument("--tools", default="clipkit,openclip", help="comma list of: clipkit, openclip")
    p.add_argument("--skip-steps", type=int, default=3, help="first steps left out of the steady rate")
    p.add_argument("--out", default="runs/bench_scaling", help="shards, run folders and logs")
    _record.add_record_flag(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.global_batch < 2 or args.global_batch % 2:
        p.error(f"--global-batch must be even and >= 2, got {args.global_batch}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = _record.output_dir(ROOT / args.out) / datetime.now().strftime("%Y%m%d-%H%M%S")
    size = MODELS[args.model][1]
    shards = write_shards(ROOT / args.out / f"shards-{size}px-{args.global_batch}", 2 * args.epoch_batches,
                          args.global_batch // 2, size)  # fmt: skip
    load_start = _record.load_average()
    print(f"[scaling] load average at the start (1, 5, 15 min): {load_start}", flush=True)
    rows, folders = [], {}
    for tool in args.tools.split(","):
        for procs in (1, 2):
            row, folder = run(tool, setup_for(args, shards, procs), procs, out, args.skip_steps)
            rows.append(row)
            folders[tool, procs] = folder
            print(
                f"[scaling] {tool} {procs}p: {row.samples} samples, {fmt(row.steady_sps)} samples/s steady, "
                f"{fmt(row.e2e_sps)} e2e, load {row.load} {row.note}",
                flush=True,
            )
    diff = None
    ran = {(r.tool, r.procs) for r in rows if not r.note}
    if {("clipkit", 1), ("clipkit", 2)} <= ran:
        diff = max_weight_difference(folders["clipkit", 1], folders["clipkit", 2])
    text, ok = report(rows, diff, args)
    text += f"\n\nload average (1, 5, 15 min): {load_start} at the start, {_record.load_average()} at the end"
    print("\n" + text, flush=True)
    stamp = datetime.now().isoformat(timespec="seconds")
    section = _record.heading_text(f"Scaling: 1 and 2 processes ({stamp})", "scaling.py", argv) + f"{text}\n"
    _record.save_report("scaling", section, args.record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
