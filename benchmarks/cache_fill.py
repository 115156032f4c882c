"""Filling the locked-tower feature cache: the fill before lanes against today's, side by side, one run.

Both sides do the same work: the demo's locked image tower (train/lit_emoji.yaml: EfficientNet-
Lite0, bundled ImageNet weights, 160 px, channels-last, float32) over every image of
data/emoji/train (7,122 by default; ``--shards N`` for the first N shards), from the tar shards
to ``{key: (1280,) features}`` in memory. Neither writes the cache folder, so every run starts cold.

- old: the fill as it was before lanes (``old_fill``, copied from ``feature_cache._compute`` at
  commit 797d9a5): batches of 64 from the data pipeline (decoded by the recipe's 2 loader
  workers, captions tokenized), each pushed through the tower on all torch threads.
- new: ``clipkit.training.feature_cache._compute``, as ``build_feature_cache`` runs it: one lane
  per torch thread, each a single-threaded tower pass on 16 images (``LANE_ROWS``), while the loader workers
  decode the next batches (``clipkit.models.inference.in_lanes``); the tower pass is a frozen
  TorchScript graph traced on the first batch (``clipkit.models.inference.graph_mode``: batch
  norms folded into the convolutions, ~1e-5 from the eager pass; tracing is inside the timing).

Same shards, the same ``data`` settings (loader workers), the same ``--threads`` (default: one
per core) in one process; runs alternate old / new ``--repeats`` times, medians reported. The
features of the two sides are compared too (channels-last fp32 on both; the folded batch norms
and oneDNN's other kernels for batches under 16 images put them ~1e-5 apart). Images/s
counts from the start of the pass (loader workers starting included) to its last row.
Target: new / old images/s >= 2.0; exit status 1 when missed. The load average is printed at
the start and the end: run it on a quiet machine.

    .venv/bin/python benchmarks/cache_fill.py --record                 # 3 repeats, ~10 min on 2 cores
    .venv/bin/python benchmarks/cache_fill.py --shards 1 --repeats 1   # smoke: stdout + runs/bench/cache_fill/

``--bf16`` also times the new fill under bf16 autocast where the CPU computes in bf16
(detected: ``clipkit.models.embed.bf16_support``; ``train.feature_cache_precision=bf16``, a
cache of its own). That row has no target: its features are not the fp32 ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record

RECIPE = ROOT / "train" / "lit_emoji.yaml"
TARGET = 2.0  # new / old images/s
OLD_BATCH = 64  # feature_cache.BUILD_BATCH before lanes


def old_fill(model, data_cfg, shards: list[Path], precision: str = "fp32") -> dict:
    """The fill before lanes (``feature_cache._compute`` at 797d9a5), without the progress bar."""
    import torch

    from clipkit.data import build_loader
    from clipkit.models.inference import bulk_inference
    from clipkit.training.stream import split_inputs

    cfg = dataclasses.replace(data_cfg, batch_size=OLD_BATCH, shuffle_buffer=0)
    loader = build_loader(
        cfg, "::".join(str(s) for s in shards), model.image_transform(train=False), model.tokenize,
        train=False, seed=0, rank=0, world_size=1,
    )  # fmt: skip
    found: dict = {}
    model.eval()
    with torch.inference_mode(), bulk_inference(model.vision, precision) as prep:
        for batch in loader:
            inputs, meta = split_inputs(batch)
            pick = [i for i, k in enumerate(meta.keys) if k not in found]
            if not pick:
                continue
            flat = inputs["image"][pick].reshape(-1, *inputs["image"].shape[-3:])  # (b, 3, H, W)
            out = model.tower_features(prep(flat)).float().cpu().numpy()  # (b, F)
            for row, i in enumerate(pick):
                found[meta.keys[i]] = out[row]
    return found


def new_fill(model, data_cfg, shards: list[Path], precision: str = "fp32") -> dict:
    """Today's fill: what ``build_feature_cache`` computes for the missing keys of ``shards``."""
    import torch
    from tqdm import tqdm

    from clipkit.training import feature_cache as fc

    job = fc.CacheJob(model, model.tower_features, "bench", 1, precision)
    wanted = {k for keys in fc.scan_keys(shards).values() for k in keys}
    with tqdm(disable=True) as bar:
        return fc._compute(job, data_cfg, shards, wanted, torch.device("cpu"), bar)


def timed(fill, *args) -> tuple[float, dict]:
    t0 = time.perf_counter()
    found = fill(*args)
    return len(found) / (time.perf_counter() - t0), found


def compare(old: dict, new: dict) -> tuple[float, int]:
    """(max |old - new| over all features, rows that are bit-identical)."""
    import numpy as np

    assert set(old) == set(new), "the two fills computed different keys"
    diffs = [float(np.abs(old[k] - new[k]).max()) for k in old]
    return max(diffs), sum(d == 0.0 for d in diffs)


def shard_list(n: int) -> list[Path]:
    train = ROOT / "data" / "emoji" / "train"
    if not train.is_dir():
        from data_tools import build_emoji

        print(f"building the emoji shards into {train.parent}", flush=True)
        build_emoji.build(train.parent)
    shards = sorted(train.glob("shard-*.tar"))
    return shards[:n] if n > 0 else shards


def machine(threads: int) -> str:
    import torch

    from clipkit.models.embed import bf16_support

    bf16 = bf16_support("cpu") or "none (bf16 would be emulated)"
    return (
        f"{os.cpu_count()} cores, torch {torch.__version__} on {threads} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {bf16}"
    )


def measure(opts: argparse.Namespace) -> tuple[list[str], _record.Targets]:
    import torch

    from clipkit.config import load_config
    from clipkit.models import build_model
    from clipkit.models.embed import bf16_support
    from clipkit.training.feature_cache import LANE_ROWS

    threads = opts.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    cfg = load_config(RECIPE, [f"data.workers={opts.workers}"] if opts.workers is not None else [])
    model = build_model(cfg.model)
    shards = shard_list(opts.shards)
    lines = [
        f"machine: {machine(threads)}",
        f"load average at start: {_record.load_average()}",
        f"shards: {len(shards)} of {shards[0].parent} ({cfg.model.vision.name}, {cfg.model.vision.image_size} px)",
        f"loader workers {cfg.data.workers}; old: batches of {OLD_BATCH} on {threads} threads; "
        + f"new: {threads} lanes x {LANE_ROWS} images, 1 thread each",
    ]
    rates: dict[str, list[float]] = {"old": [], "new": []}
    feats: dict[str, dict] = {}
    for rep in range(opts.repeats):
        for name, fill in (("old", old_fill), ("new", new_fill)):
            rate, feats[name] = timed(fill, model, cfg.data, shards)
            rates[name].append(rate)
            print(f"repeat {rep + 1}: {name} {rate:.1f} img/s ({len(feats[name])} images)", flush=True)
    old, new = statistics.median(rates["old"]), statistics.median(rates["new"])
    worst, same = compare(feats["old"], feats["new"])
    lines += [
        f"old: {old:.1f} img/s (runs: {', '.join(f'{r:.1f}' for r in rates['old'])})",
        f"new: {new:.1f} img/s (runs: {', '.join(f'{r:.1f}' for r in rates['new'])})",
        f"new / old: {new / old:.2f}x",
        f"features: {same} of {len(feats['old'])} rows bit-identical, max |old - new| {worst:.1e}",
    ]
    targets = _record.Targets()
    lines.append(targets.check(f"new / old images/s >= {TARGET}", new / old >= TARGET, f"{new / old:.2f}x"))
    lines.append(targets.check("features equal (max |old - new| <= 1e-4)", worst <= 1e-4, f"{worst:.1e}"))
    if opts.bf16:
        if bf16_support("cpu"):
            rate, _ = timed(new_fill, model, cfg.data, shards, "bf16")
            lines.append(
                f"new, bf16 autocast (no target; other numbers): {rate:.1f} img/s, {rate / old:.2f}x old"
            )
        else:
            lines.append("new, bf16 autocast: not run, this CPU has no native bf16")
    lines.append(f"load average at end: {_record.load_average()}")
    return lines, targets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=0, help="first N shards of data/emoji/train (0 = all 15)")
    p.add_argument("--repeats", type=int, default=3, help="old / new runs, alternating (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (default: one per core)")
    p.add_argument(
        "--workers", type=int, default=None, help="loader workers for both (default: the recipe's 2)"
    )
    p.add_argument(
        "--bf16", action="store_true", help="also time the new fill under bf16 autocast (no target)"
    )
    _record.add_record_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lines, targets = measure(opts)
    report = "\n".join(
        [*_record.heading("Feature cache fill: before lanes vs now", "cache_fill.py", argv), "```", *lines, "```", "",
         targets.summary(), ""]
    )  # fmt: skip
    print("\n" + report, flush=True)
    _record.save_report("cache_fill", report, opts.record)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
