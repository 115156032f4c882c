"""The local engine against Ray on 1 and 2 workers: the same `data build` and `index embed`.

    .venv/bin/python benchmarks/engines.py                                   # 2,000 images
    .venv/bin/python benchmarks/engines.py --images 60 --shard-size 10       # a quick look
    .venv/bin/python benchmarks/engines.py --record                          # + a section in RESULTS.md

Method. ``--images`` random photos (JPEG, ``--image-size``) with a caption each are served by a
local HTTP server (``python -m http.server``, its own process) and listed in a URL list. For
each worker count W in ``--workers`` (default 1 2), this process is pinned to W cores
(``sched_setaffinity``; so is the Ray cluster it starts, once started), then:

* build: ``clipkit data build urls.txt`` (download + decode + resize to ``--max-side`` + JPEG
  encode, ``--shard-size`` items per shard) with the local engine (its thread pool) and with
  ``--engine ray`` on a local cluster of W CPUs (one task per shard);
* embed: ``clipkit index embed --shards`` of those shards with ``--model`` (float32), locally
  (torch on W threads) and with ``--engine ray`` (W CPU actors, one thread each).

Times are wall clock from the call to the complete output (Ray: the cluster already started,
its workers cold; the local embed and each Ray actor load the model). Checks: every Ray output
equals the local one with W=1: build byte for byte (all files, ``_stats.json`` bar
``elapsed_s``), embed vectors within ``--atol`` and identical metadata, markers and
``embed_info.json``. Each check is a target: exit status 1 when outputs differ. The report goes
to stdout and runs/bench/engines/; ``--record`` appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _record

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- inputs


def make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    """``n`` random photos (smooth colour fields plus noise, so JPEG has real work) + captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if path.is_file():
            continue
        a, b, c = rng.uniform(0.002, 0.02, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * c)], -1) * 90 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)  # (h, w, 3)
        Image.fromarray(pixels).save(path, quality=90)


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """``python -m http.server`` over ``folder`` on a free local port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def pinned(cores: int) -> Iterator[str]:
    """Run the block on the first ``cores`` CPUs this process may use; yields their list."""
    before = os.sched_getaffinity(0)
    chosen = sorted(before)[:cores]
    os.sched_setaffinity(0, chosen)
    try:
        yield ",".join(map(str, chosen))
    finally:
        os.sched_setaffinity(0, before)


# --------------------------------------------------------------------------- the two jobs


def build(engine: str, urls: Path, out: Path, args: argparse.Namespace) -> float:
    from clipkit.data.build import BuildOptions, build_shards
    from clipkit.data.engines.ray_build import build_shards_ray
    from clipkit.data.imageops import ImageOptions
    from clipkit.data.sources import open_source

    opts = BuildOptions(
        shard_size=args.shard_size, image=ImageOptions(max_side=args.max_side), threads=args.threads
    )
    t0 = time.perf_counter()
    items = open_source(urls)[1]
    run = build_shards_ray if engine == "ray" else build_shards
    run(items, out, opts, source=str(urls))
    return time.perf_counter() - t0


def embed(engine: str, shards: Path, out: Path, args: argparse.Namespace, threads: int) -> float:
    import torch

    from clipkit.index.embed import embed_collection
    from clipkit.index.ray_embed import embed_collection_ray
    from clipkit.index.sources import open_source
    from clipkit.index.store import finish
    from clipkit.models.specs import load_model

    kw = {"batch_size": args.batch_size, "dtype": "float32", "log": lambda line: None}
    t0 = time.perf_counter()
    source = open_source(shards=str(shards))
    if engine == "ray":
        config, parts = embed_collection_ray(args.model, source, out, **kw)
    else:
        torch.set_num_threads(threads)
        model = load_model(args.model)
        config, parts = embed_collection(model, source, out, model_name=model.resolved, **kw)
    finish(out, config, parts)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- equality


def build_differences(a: Path, b: Path) -> list[str]:
    """Files that differ between two build folders (``_stats.json`` compared bar elapsed_s)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    bad = []
    for name in names:
        fa, fb = a / name, b / name
        if not (fa.is_file() and fb.is_file()):
            bad.append(f"{name} only in {a if fa.is_file() else b}")
        elif name == "_stats.json":
            sa, sb = json.loads(fa.read_text()), json.loads(fb.read_text())
            sa.pop("elapsed_s"), sb.pop("elapsed_s")
            bad += [name] if sa != sb else []
        elif fa.read_bytes() != fb.read_bytes():
            bad.append(name)
    return bad


def embed_differences(a: Path, b: Path, atol: float) -> list[str]:
    """What differs between two exports: vectors beyond ``atol``, metadata, markers, info."""
    bad = [n for n in ("embed_config.json", "embed_info.json") if json.loads((a / n).read_text()) != json.loads((b / n).read_text())]  # fmt: skip
    for npy in sorted(a.glob("part-*.npy")):
        part = npy.stem
        va, vb = np.load(npy), np.load(b / npy.name)
        if va.shape != vb.shape or np.abs(va - vb).max(initial=0.0) > atol:
            bad.append(f"{part}.npy")
        if not pq.read_table(a / f"{part}.parquet").equals(pq.read_table(b / f"{part}.parquet")):
            bad.append(f"{part}.parquet")
        ma, mb = (json.loads((d / f"{part}.json").read_text()) for d in (a, b))
        if (ma["rows"], ma["skipped"]) != (mb["rows"], mb["skipped"]):
            bad.append(f"{part}.json")
    return bad


# --------------------------------------------------------------------------- the run


def pin_cluster(cores: str) -> None:
    """Pin every process this one started (Ray's GCS, raylet and its workers) to ``cores``; the
    workers the raylet starts later inherit its mask. Ray starts unpinned: its daemons must
    register within 30 s, which one loaded core may not allow."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            proc.cpu_affinity([int(c) for c in cores.split(",")])


def start_ray(w: int, attempts: int = 3) -> None:
    """A new local cluster of ``w`` CPUs. Ray gives its daemons ~30-40 s to register; on a loaded
    machine they may not, so the start (not timed as the jobs' work) is tried again."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=w, include_dashboard=False, logging_level=logging.WARNING)
            return
        except Exception as e:  # Ray raises a bare Exception ("timed out during startup")
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            print(f"Ray did not start ({e}); trying again", flush=True)


def run_workers(w: int, urls: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """Both jobs on both engines with ``w`` cores; one row per (job, engine). Every embed reads
    the same shards: the local build of the first worker count."""
    import ray

    rows = []
    out, shards = work / f"w{w}", work / f"w{args.workers[0]}" / "build_local"
    with pinned(w) as cores:
        t = build("local", urls, out / "build_local", args)
        rows.append({"job": "build", "engine": "local", "workers": w, "cores": cores, "seconds": t})
        t = embed("local", shards, out / "embed_local", args, w)
        rows.append({"job": "embed", "engine": "local", "workers": w, "cores": cores, "seconds": t})
    t0 = time.perf_counter()
    start_ray(w)
    start = time.perf_counter() - t0
    with pinned(w) as cores:
        pin_cluster(cores)
        try:
            t = build("ray", urls, out / "build_ray", args)
            rows.append(
                {"job": "build", "engine": "ray", "workers": w, "cores": cores, "seconds": t, "start": start}
            )
            t = embed("ray", shards, out / "embed_ray", args, w)
            rows.append(
                {"job": "embed", "engine": "ray", "workers": w, "cores": cores, "seconds": t, "start": start}
            )
        finally:
            ray.shutdown()
    for r in rows:
        r["items_per_s"] = args.images / r["seconds"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| job | engine | workers (cores) | seconds | images/s | Ray cluster start s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        start = f"{r['start']:.1f}" if "start" in r else ""
        lines.append(f"| {r['job']} | {r['engine']} | {r['workers']} ({r['cores']}) | {r['seconds']:.1f} | "
                     f"{r['items_per_s']:.1f} | {start} |")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-size", default="640x480", help="WxH of the source JPEGs")
    p.add_argument("--max-side", type=int, default=256, help="data build --max-side")
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=16, help="data build --threads (downloads per process)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default=str(ROOT / "train" / "lit_emoji.yaml"), help="index embed --model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--atol", type=float, default=1e-6, help="largest vector difference counted as equal")
    p.add_argument("--work", default=str(_record.RUNS / "engines"), help="images and outputs (git-ignored)")
    _record.add_record_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if max(args.workers) > len(os.sched_getaffinity(0)):
        sys.exit(
            f"--workers {max(args.workers)}: this process may use only {len(os.sched_getaffinity(0))} cores"
        )
    work = _record.output_dir(args.work)
    loads = [_record.load_average()]
    print(f"load average at the start (1, 5, 15 min): {loads[0]}", flush=True)
    make_images(work / "images", args.images, tuple(int(x) for x in args.image_size.split("x")))
    for old in work.glob("w*"):  # outputs of an earlier run: every engine starts from an empty folder
        shutil.rmtree(old)
    rows = []
    with http_server(work / "images") as base:
        urls = work / "urls.txt"
        urls.write_text("".join(f"{base}/{i:06d}.jpg\timage {i}\n" for i in range(args.images)))
        for w in args.workers:
            rows += run_workers(w, urls, work, args)
            print(table(rows), flush=True)
    loads.append(_record.load_average())
    targets = _record.Targets()
    ref = work / f"w{args.workers[0]}"
    lines = []
    for w in args.workers:
        for engine in ("local", "ray"):
            if (w, engine) == (args.workers[0], "local"):
                continue
            diff = build_differences(ref / "build_local", work / f"w{w}" / f"build_{engine}")
            lines.append(targets.check(f"build {engine} W={w} == local W={args.workers[0]}, byte for byte",
                                       not diff, ", ".join(diff[:5]) or "all files equal"))  # fmt: skip
            diff = embed_differences(ref / "embed_local", work / f"w{w}" / f"embed_{engine}", args.atol)
            lines.append(targets.check(f"embed {engine} W={w} == local W={args.workers[0]} (vectors within {args.atol:g})",
                                       not diff, ", ".join(diff[:5]) or "vectors, metadata and markers equal"))  # fmt: skip
    speed = {(r["job"], r["engine"], r["workers"]): r["items_per_s"] for r in rows}
    scaling = [
        f"{job} {engine}: W={w} / W={args.workers[0]} = {speed[(job, engine, w)] / speed[(job, engine, args.workers[0])]:.2f}x"
        for job in ("build", "embed") for engine in ("local", "ray") for w in args.workers[1:]
    ]  # fmt: skip
    text = (
        table(rows) + "\n\nscaling (images/s): " + "; ".join(scaling) + "\n\n"
        + "".join(f"- {line}\n" for line in lines) + f"\nVerdict: {targets.summary()}.\n"
    )  # fmt: skip
    print(text + f"load average at the end (1, 5, 15 min): {loads[1]}", flush=True)
    _record.save_report("engines", section(text, argv, args, loads), args.record)
    return targets.exit_code()


def section(text: str, argv: list[str], args: argparse.Namespace, loads: list[str]) -> str:
    import ray
    import torch

    title = f"Engines: local against Ray {dt.datetime.now().isoformat(timespec='seconds')}"
    return (
        _record.heading_text(title, "engines.py", argv)
        + f"""machine: {os.cpu_count()} cpus, load average (1, 5, 15 min) {loads[0]} at the start, {loads[1]} at the end; ray {ray.__version__}, torch {torch.__version__}, python {platform.python_version()}
work: {args.images} JPEGs {args.image_size} over local HTTP -> `data build` (max side {args.max_side}, {args.shard_size} per shard, {args.threads} download threads per process) -> `index embed` ({Path(args.model).name}, batch {args.batch_size}, float32); each worker count W pinned to W cores, Ray cluster of W CPUs

{text}"""
    )


if __name__ == "__main__":
    sys.exit(main())
