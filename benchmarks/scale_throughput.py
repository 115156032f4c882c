"""Per-core throughput of the three bulk stages, the inputs of the cost model in benchmarks/SCALE.md.

    .venv/bin/python benchmarks/scale_throughput.py                       # the measurement (quiet machine)
    .venv/bin/python benchmarks/scale_throughput.py --images 64 --add-n 2000 --nlist 256   # smoke
    .venv/bin/python benchmarks/scale_throughput.py --record              # + append to RESULTS.md

Stages, each run with 1 thread and with every core (``--threads``), in this process:

1. download + encode: ``clipkit data build FOLDER`` over ``--images`` synthetic photo JPEGs
   (longest side 400-1000 px, the generator of ``loader_throughput.py``) with sidecar
   captions: read, decode, resize to the default longest side 512, re-encode, write shards.
   Local files, so no network: at scale, fetching is bounded by bandwidth, not cores.
2. embed: ``clipkit index embed``'s work (``embed_collection``; the model is loaded before the
   clock starts) on those images with the demo model (``train/lit_emoji.yaml``:
   EfficientNet-Lite0 + MiniLM, 256-d) at image size 160 and 224, on the CPU.
3. index add: vectors of width ``--dim`` added to ``IVF<nlist>,PQ<m>`` (the coarse
   assignment costs ``2 * nlist * dim`` flops per vector and dominates). The quantizer holds
   ``--nlist`` sampled vectors instead of k-means centroids: the add costs the same.

Per-core rate = rate with 1 thread. The checks (exit 1 when missed) are that each stage
wrote every input: as many shard samples, embedding rows and index entries as inputs. The
report goes to stdout and runs/bench/scale_throughput/; ``--record`` appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record

DEMO_RECIPE = ROOT / "train" / "lit_emoji.yaml"


def make_images(folder: Path, n: int, seed: int = 0) -> float:
    """``n`` JPEG + .txt pairs in ``folder`` (reused when already there); returns mean bytes per image."""
    from loader_throughput import _cliparts, _photos, _sample

    jpgs = sorted(folder.glob("*.jpg"))
    if len(jpgs) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        rng = random.Random(seed)
        photos, cliparts = _photos(), _cliparts(min(300, n), rng)
        for i in range(n):
            jpg, caption = _sample(rng, photos, cliparts)
            (folder / f"{i:07d}.jpg").write_bytes(jpg)
            (folder / f"{i:07d}.txt").write_text(caption)
        jpgs = sorted(folder.glob("*.jpg"))
    return sum(p.stat().st_size for p in jpgs) / max(1, len(jpgs))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stage_build(images: Path, work: Path, threads: int) -> tuple[float, int]:
    from clipkit.cli.main import main
    from clipkit.data.shards import read_sizes

    out = work / f"shards_t{threads}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["data", "build", str(images), "--out", str(out), "--threads", str(threads), "--shard-size", "500"]
    seconds = timed(lambda: main(argv))
    return seconds, sum(read_sizes(out).values())


def stage_embed(images: Path, work: Path, threads: int, size: int) -> tuple[float, int]:
    """Embed time only: the model is loaded first, outside the clock (a fixed cost per worker)."""
    import torch

    from clipkit.index.embed import embed_collection
    from clipkit.index.sources import open_source
    from clipkit.index.store import EmbeddingSet, finish
    from clipkit.models.specs import load_model

    torch.set_num_threads(threads)
    overrides = [f"model.vision.image_size={size}"]
    model = load_model(str(DEMO_RECIPE), overrides, "cpu")
    out = work / f"emb_{size}_t{threads}"
    shutil.rmtree(out, ignore_errors=True)

    def embed() -> None:
        source = open_source(folder=str(images))
        config, parts = embed_collection(model, source, out, model_name=model.resolved, model_overrides=overrides,
                                         batch_size=64, log=lambda _: None)  # fmt: skip
        finish(out, config, parts)

    seconds = timed(embed)
    return seconds, EmbeddingSet(out).n


def stage_add(n: int, dim: int, nlist: int, m: int, threads: int) -> tuple[float, int]:
    import faiss
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n + nlist, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    faiss.omp_set_num_threads(threads)
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{m}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(x[:nlist])  # stands in for k-means centroids: IndexIVF trains only the PQ then
    faiss.downcast_index(ivf).do_polysemous_training = False
    faiss.downcast_index(ivf).pq.cp.min_points_per_centroid = 1  # a smoke-sized sample: no warning
    index.train(x[nlist : nlist + min(n, 256 * 40)])
    seconds = timed(lambda: index.add(x[nlist:]))
    return seconds, int(index.ntotal)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000, help="JPEGs for the build and embed stages")
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 224], help="embed image sizes")
    p.add_argument("--add-n", type=int, default=50_000, help="vectors added in the index stage")
    p.add_argument("--dim", type=int, default=256, help="vector width (the demo model's: 256)")
    p.add_argument("--nlist", type=int, default=65_536, help="IVF lists (65536: the 1B-pair setting)")
    p.add_argument("--pq", type=int, default=32, help="PQ code bytes per vector")
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument(
        "--stages", nargs="+", default=["build", "embed", "add"], choices=["build", "embed", "add"]
    )
    p.add_argument("--work", default=str(_record.RUNS / "scale_throughput"))
    _record.add_record_flag(p)
    return p


def run_stages(args: argparse.Namespace, work: Path, targets: _record.Targets) -> list[dict]:
    images = work / f"images_{args.images}"
    rows = []
    if {"build", "embed"} & set(args.stages):
        kb = make_images(images, args.images) / 1024
        print(f"{args.images} JPEGs in {images} ({kb:.0f} KiB on average)", flush=True)
    if "build" in args.stages:  # warm-up, untimed: imports, codecs, the first pool
        make_images(work / "images_warm", 8)
        stage_build(work / "images_warm", work, 1)
    jobs = []
    for t in args.threads:
        if "build" in args.stages:
            jobs.append(
                ("download+encode", "images", args.images, lambda t=t: stage_build(images, work, t), t)
            )
        if "embed" in args.stages:
            for s in args.sizes:
                jobs.append(
                    (
                        f"embed {s}px",
                        "images",
                        args.images,
                        lambda t=t, s=s: stage_embed(images, work, t, s),
                        t,
                    )
                )
        if "add" in args.stages:
            what = f"add IVF{args.nlist},PQ{args.pq} d={args.dim}"
            jobs.append(
                (
                    what,
                    "vectors",
                    args.add_n,
                    lambda t=t: stage_add(args.add_n, args.dim, args.nlist, args.pq, t),
                    t,
                )
            )
    for stage, unit, n, job, t in jobs:
        seconds, done = job()
        load = os.getloadavg()[0]
        row = {"stage": stage, "unit": unit, "threads": t, "seconds": seconds, "n": done,
               "rate": done / seconds, "per_core": done / seconds / t, "load": load}  # fmt: skip
        rows.append(row)
        targets.check(f"{stage}, {t} threads: all {n} {unit} written", done == n, f"{done}")
        print(f"  {stage:32s} threads={t:2d}: {row['rate']:9.1f} {unit}/s, {row['per_core']:9.1f}/core-s "
              f"({seconds:.1f} s, load {load:.1f})", flush=True)  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | threads | items | seconds | items/s | items/s per core | load (1 min) |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['stage']} | {r['threads']} | {r['n']} {r['unit']} | {r['seconds']:.1f} | "
                     f"{r['rate']:.1f} | {r['per_core']:.1f} | {r['load']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = _record.output_dir(args.work, args.record)
    load_start = _record.load_average()
    print(f"load average at the start (1, 5, 15 min): {load_start}", flush=True)
    targets = _record.Targets()
    rows = run_stages(args, work, targets)
    load_end = _record.load_average()
    title = f"Per-core throughput of the bulk stages {dt.datetime.now().isoformat(timespec='seconds')}"
    text = (
        _record.heading_text(title, "scale_throughput.py", argv)
        + f"""machine: {os.cpu_count()} cpus, load average (1, 5, 15 min) {load_start} at the start, {load_end} at the end

{table(rows)}

Verdict: {targets.summary()}.
"""
    )
    print(text, flush=True)
    _record.save_report("scale_throughput", text, args.record)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
