"""Chaos test of training: SIGKILL a run at random moments, resume each time, check nothing was lost.

    .venv/bin/python benchmarks/chaos.py                   # ~5 minutes of training, 10 kills
    .venv/bin/python benchmarks/chaos.py --minutes 0.5     # a quick look
    .venv/bin/python benchmarks/chaos.py --record          # + a section in RESULTS.md

Method. Tiny shards with an ``idx`` member and the tests' tiny model (a locked, cached vision
tower; the top 2 text blocks train) are trained with ``clipkit train`` in deterministic mode,
one torch thread, ``train.log_sample_ids=true``:

1. calibration: a short run measures samples/s, which sets ``train.samples`` so that the
   uninterrupted run lasts about ``--minutes`` (or give ``--samples``);
2. reference: the uninterrupted run;
3. chaos: the same config in another run folder, SIGKILLed ``--kills`` times and resumed with
   ``train.resume=latest`` after each kill. Each kill happens when the running process has
   logged a step drawn at random (so at a random point of the step after it), except one
   (``--checkpoint-kills``, default 1) that happens while a checkpoint is being written: the
   checkpoint folder is polled until a temporary file or a checkpoint without its sidecar
   appears.

Reported: kills survived (the run resumed and finished); checkpoints lost (a checkpoint that
was complete, with a matching sidecar, before a kill and not usable after it, plus any
checkpoint ``latest()`` had to skip); samples repeated or skipped (from the sample log: within
each epoch an idx seen twice, or, in every finished epoch, an idx missing; the sample count
against the budget); whether the final weights equal the reference's bit for bit. Each is a
target; the exit status is 1 when one is missed. The report goes to stdout and
runs/bench/chaos/ (with ``result.json`` in ``--out``), and to RESULTS.md only with ``--record``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _record

from clipkit.data import ShardWriter
from clipkit.training import checkpoint as ckpt
from clipkit.training.sample_log import last_step_since_resume, read_sample_log, sample_log_path

ROOT = Path(__file__).resolve().parent.parent


def write_shards(folder: Path, n_shards: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cat", "dog", "bird", "small", "large", "happy", "sad", "tree", "sun"]
    with ShardWriter(folder, prefix="chaos", maxcount=per_shard) as writer:
        for i in range(n_shards * per_shard):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            caption = " ".join(rng.choice(words, 3))
            writer.write({"__key__": f"c{i:06d}", "png": buf.getvalue(), "txt": caption})  # idx = i
    return str(folder)


def recipe(shards: str, out: Path, args: argparse.Namespace) -> dict:
    tiny = {"name": "open_clip:clipkit-tiny-ViT", "weights": "", "locked": True}
    return {
        "model": {
            "vision": {**tiny, "image_size": 32},
            "text": {**tiny, "context_length": 16, "unlocked_layers": 2},
            "embed_dim": 16,
        },
        "data": {"train": shards, "batch_size": 8, "workers": args.workers, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "train": {
            "output_dir": str(out),
            "checkpoint_every": args.checkpoint_every,
            "keep_last": 3,
            "log_every": 50,
            "deterministic": True,
            "threads": 1,
            "log_sample_ids": True,
            "seed": args.seed,
        },
    }


class Trainer:
    """``clipkit train`` as a child process on the chaos recipe."""

    def __init__(self, recipe_path: Path, log: Path):
        self.recipe_path, self.log = recipe_path, log

    def command(self, *overrides: str) -> list[str]:
        return [sys.executable, "-m", "clipkit.cli.main", "train", str(self.recipe_path), *overrides]

    def start(self, *overrides: str) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(self.log, "a") as log:
            log.write(f"\n$ {shlex.join(self.command(*overrides))}\n")
            log.flush()
            return subprocess.Popen(self.command(*overrides), cwd=ROOT, env=env, stdout=log, stderr=log)

    def run(self, *overrides: str) -> float:
        t0 = time.perf_counter()
        proc = self.start(*overrides)
        if proc.wait() != 0:
            raise SystemExit(f"training failed (exit {proc.returncode}); see {self.log}")
        return time.perf_counter() - t0


def steps_of_this_process(run_dir: Path) -> int:
    return last_step_since_resume(sample_log_path(run_dir))


def complete_checkpoints(run_dir: Path) -> dict[str, str]:
    """{name: sha256} of the checkpoints whose sidecar matches right now."""
    out = {}
    for path in ckpt.list_checkpoints(run_dir):
        try:
            if ckpt.problem(path) is None:
                out[path.name] = json.loads(ckpt.sidecar_path(path).read_text())["sha256"]
        except (OSError, ValueError):
            continue  # pruned while we looked
    return out


def wait_and_kill(proc: subprocess.Popen, run_dir: Path, step: int | None, deadline: float) -> str:
    """SIGKILL ``proc`` once it logged ``step`` (None: once a checkpoint write is seen)."""
    while True:
        if proc.poll() is not None:
            return "ended before the kill"
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            return "timeout"
        # (a killed run's stale temporary files are removed before this process's first step)
        if step is None and steps_of_this_process(run_dir) >= 1 and ckpt.write_in_progress(run_dir):
            break
        if step is not None and steps_of_this_process(run_dir) >= step:
            break
        time.sleep(0.001 if step is None else 0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "during a checkpoint write" if step is None else f"after step {steps_of_this_process(run_dir)}"


def sample_audit(log: dict[int, list[tuple[int, list[int]]]], n_samples: int, budget: int) -> dict[str, int]:
    by_epoch: dict[int, list[int]] = {}
    for step in sorted(log):
        for epoch, idx in log[step]:
            by_epoch.setdefault(epoch, []).extend(idx)
    repeated = sum(len(v) - len(set(v)) for v in by_epoch.values())
    last = max(by_epoch, default=0)
    skipped = sum(n_samples - len(set(v)) for e, v in by_epoch.items() if e < last)
    seen = sum(len(v) for v in by_epoch.values())
    return {"repeated": repeated, "skipped": skipped, "seen": seen, "budget": budget}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = ckpt.load(ckpt.latest(a))["model"], ckpt.load(ckpt.latest(b))["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def chaos(args: argparse.Namespace) -> dict:
    out = Path(args.out).resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    n_samples = args.shards * args.per_shard
    shards = write_shards(out / "shards", args.shards, args.per_shard)
    tree = recipe(shards, out, args)
    recipe_path = out / "chaos.yaml"
    recipe_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    trainer = Trainer(recipe_path, out / "train.log")

    samples = args.samples
    if not samples:  # calibrate: steady samples/s of a short run
        trainer.run("train.run_name=calibrate", f"train.samples={8 * 120}", "train.log_every=40")
        with open(out / "calibrate" / "metrics.csv") as f:
            rate = float(list(__import__("csv").DictReader(f))[-1]["samples_per_s"])
        samples = max(8 * 4 * args.kills, int(rate * args.minutes * 60) // 8 * 8)
    budget = [f"train.samples={samples}"]
    ref_s = trainer.run("train.run_name=reference", *budget)
    steps = -(-samples // 8)

    run_dir = out / "chaos"
    rng = random.Random(args.seed)
    plan: list[int | None] = sorted(rng.sample(range(1, steps - 1), args.kills - args.checkpoint_kills))
    for _ in range(args.checkpoint_kills):  # a checkpoint write, at a random place in the order
        plan.insert(rng.randrange(len(plan) + 1), None)
    kills, lost, events = 0, 0, []
    t0 = time.perf_counter()
    proc = trainer.start("train.run_name=chaos", *budget)
    for target in plan:
        before = complete_checkpoints(run_dir)
        how = wait_and_kill(proc, run_dir, target, deadline=time.time() + 4 * ref_s + 120)
        if how in ("ended before the kill", "timeout"):
            events.append(how)
            break
        kills += 1
        after = complete_checkpoints(run_dir)
        newest_before = max(before, default=None)
        if newest_before and not any(name >= newest_before for name in after):
            lost += 1  # the newest complete checkpoint did not survive the kill
        lost += sum(1 for name, sha in before.items() if name in after and after[name] != sha)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed_from = ckpt.latest(run_dir)
        lost += sum(
            "skipping checkpoint" in str(w.message) and "sidecar" not in str(w.message) for w in caught
        )
        events.append(f"{how} -> resume from {resumed_from.name if resumed_from else 'scratch'}")
        proc = trainer.start("train.run_name=chaos", "train.resume=latest", *budget)
    code = proc.wait()
    chaos_s = time.perf_counter() - t0
    survived = code == 0 and kills == len(plan)
    log = read_sample_log(sample_log_path(run_dir))
    audit = sample_audit(log, n_samples, samples)
    equal = survived and same_weights(out / "reference", run_dir)
    return {
        "samples": samples,
        "steps": steps,
        "reference_s": ref_s,
        "chaos_s": chaos_s,
        "kills": kills,
        "planned": len(plan),
        "survived": survived,
        "checkpoints_lost": lost,
        **audit,
        "weights_equal": equal,
        "events": events,
        "log_matches_reference": log == read_sample_log(sample_log_path(out / "reference")),
    }


def table(r: dict, args: argparse.Namespace, targets: _record.Targets) -> str:
    checks = [  # (check, result, target, met)
        ("kills survived", f"{r['kills'] if r['survived'] else 0} of {r['planned']}", f"{r['planned']}",
         r["survived"]),
        ("checkpoints lost", str(r["checkpoints_lost"]), "0", r["checkpoints_lost"] == 0),
        ("samples repeated within an epoch", str(r["repeated"]), "0", r["repeated"] == 0),
        ("samples skipped in finished epochs", str(r["skipped"]), "0", r["skipped"] == 0),
        ("samples seen / budget", f"{r['seen']:,} / {r['budget']:,}", "equal", r["seen"] == r["budget"]),
        ("sample order = reference's", "yes" if r["log_matches_reference"] else "no", "yes",
         r["log_matches_reference"]),
        ("final weights = reference's (bit for bit)", "yes" if r["weights_equal"] else "no", "yes",
         r["weights_equal"]),
    ]  # fmt: skip
    for check, result, want, met in checks:
        targets.check(f"{check}: {want}", met, result)
    lines = ["| check | result | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {'yes' if ok else 'NO'} |" for a, b, c, ok in checks]
    head = (
        f"tiny model, {args.shards} shards x {args.per_shard} samples, batch 8, data.workers={args.workers}, "
        f"checkpoint every {args.checkpoint_every} steps (keep 3), deterministic, 1 thread; "
        f"{r['samples']:,} samples = {r['steps']:,} steps; uninterrupted run {r['reference_s']:.0f} s wall "
        f"(incl. start-up), chaos run {r['chaos_s']:.0f} s wall incl. {r['kills'] + 1} start-ups"
    )
    kills = "; ".join(r["events"])
    return f"{head}\n\n" + "\n".join(lines) + f"\n\nkills: {kills}\n\nVerdict: {targets.summary()}.\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="length of the uninterrupted run (default 5)")
    p.add_argument("--samples", type=int, default=0, help="train.samples (default: calibrated to --minutes)")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--checkpoint-kills", type=int, default=1, help="kills during a checkpoint write")
    p.add_argument("--workers", type=int, default=2, help="data.workers")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(_record.RUNS / "chaos"))
    _record.add_record_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 <= args.checkpoint_kills <= args.kills:
        p.error("--checkpoint-kills must be between 0 and --kills")
    _record.output_dir(args.out)
    load_start = _record.load_average()
    print(f"load average at the start (1, 5, 15 min): {load_start}", flush=True)
    result = chaos(args)
    targets = _record.Targets()
    text = table(result, args, targets)
    print(text)
    _record.write_text(Path(args.out) / "result.json", json.dumps(result, indent=1))
    load_end = _record.load_average()
    print(f"load average at the end (1, 5, 15 min): {load_end}", flush=True)
    machine = (
        f"{os.cpu_count()} cpus, torch {torch.__version__}, python {platform.python_version()}, load average "
        f"(1, 5, 15 min) {load_start} at the start, {load_end} at the end"
    )
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    section = _record.heading_text(f"Chaos: SIGKILL and resume ({stamp})", "chaos.py", argv)
    section += f"machine: {machine}\n\n{text}"
    _record.save_report("chaos", section, args.record)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
