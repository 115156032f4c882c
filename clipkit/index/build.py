"""``clipkit index build``: the right FAISS index for an embedding export and a memory budget.

1. Held-out queries: ``--queries Q.npy`` (e.g. text embeddings), or a random sample of the
   collection itself; then each query's own id is dropped from every result list, so the
   trivially found self-match does not count towards recall.
2. Ground truth: exact inner-product top-k, streamed part by part (``faiss.knn`` + a heap).
3. Candidates from ``choose.plan`` (or ``--key``); for each, through its family
   (``clipkit.index.families``): train on a random sample, add the parts one by one, tune
   the search parameter (``nprobe``, ``efSearch``, ...) to the smallest value at which
   recall@k reaches the target with 97.5% confidence (mean - 2 standard errors over the
   queries), so that new queries reach it too. Flat is exact by construction (the ground
   truth is the same scan) and is not searched again. Above ``choose.EXACT_ONLY_N`` vectors
   the first candidate of each structure (flat, hnsw, ivf) that reaches the target is built
   and the one with the most queries/s at batch 1 (a time-boxed measurement) wins;
   otherwise the first to reach it.
   When one misses, only candidates with finer codes or another structure are tried next; an
   IVF candidate with the same lists as an earlier one reuses its k-means centroids.
   Adding runs in this process, or (``partitions`` > 1, or lists on disk) per partition of the
   parts on a process pool or Ray, joined afterwards (``clipkit.index.partition``); the lists
   go on disk (``clipkit.index.ondisk``) when the chosen index is larger than the budget,
   which only an explicit ``--key`` (or ``--trained``) allows.
4. Write ``index.faiss`` (+ its ``index.<token>.ivfdata`` when on disk), ``trained.faiss`` (the trained, empty index: build other shards
   with ``--trained`` to merge them later), ``metadata.parquet`` (row/``id`` i = FAISS id i)
   and ``report.json``, each atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipkit.data.atomic import atomic_open
from clipkit.errors import ClipkitError
from clipkit.index import choose, ondisk
from clipkit.index.families import Candidate, family
from clipkit.index.partition import ONE_PROCESS, WORK_PREFIX, FillPlan, fill
from clipkit.index.store import EmbeddingSet, write_json

INDEX_FILE, TRAINED_FILE, META_FILE, REPORT_FILE = (
    "index.faiss",
    "trained.faiss",
    "metadata.parquet",
    "report.json",
)


class BuildError(ClipkitError, ValueError):
    """Bad build input: queries of the wrong width, a --trained index that does not fit, ..."""


# ----------------------------------------------------------------------------- helpers


def write_index(index: faiss.Index, path: Path) -> None:
    with atomic_open(path) as f:
        writer = faiss.PyCallbackIOWriter(f.write)
        faiss.write_index(index, writer)
        del writer  # flushes


def rss_bytes(field: str = "VmHWM") -> int | None:
    """This process's peak (VmHWM) or current (VmRSS) resident memory; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            status = f.read()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def exact_knn(emb: EmbeddingSet, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ids of the exact inner-product top-k over all parts (-1 where n < k)."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, vectors in emb.iter_parts():
        dist, ids = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(np.ascontiguousarray(dist), np.ascontiguousarray(ids + start))
    heap.finalize()
    return heap.I


def drop_self(ids: np.ndarray, self_ids: np.ndarray | None, k: int) -> np.ndarray:
    """Remove each query's own id from its row of k+1 results (else its last); (Q, k)."""
    if self_ids is None:
        return ids[:, :k]
    keep = ids != self_ids[:, None]
    keep[keep.sum(1) > k, -1] = False  # self not among the k+1: drop the (k+1)-th instead
    return ids[keep].reshape(len(ids), k)


def per_query_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(Q,) |found ∩ truth| / |truth| per query (ids -1 are padding; FAISS never repeats an id)."""
    valid = truth >= 0  # (Q, k)
    hit = (truth[:, :, None] == found[:, None, :]).any(2) & valid  # (Q, k_truth): found among results
    return hit.sum(1) / np.maximum(1, valid.sum(1))


class Evaluator:
    """Recall@k and queries/s of an index on fixed held-out queries."""

    def __init__(self, queries: np.ndarray, truth: np.ndarray, k: int, self_ids: np.ndarray | None,
                 min_seconds: float = 0.15):  # fmt: skip
        self.queries, self.truth, self.k, self.self_ids = queries, truth, k, self_ids
        self.min_seconds = min_seconds  # how long each speed measurement runs (see qps)

    def recall(self, index: faiss.Index) -> tuple[float, float]:
        """(mean recall@k, its lower 97.5% confidence bound: mean - 2 standard errors).

        Tuning asks the bound, not the mean, to reach the target, so that the tuned index
        reaches it on new queries from the same distribution too, not just on these.
        """
        extra = 0 if self.self_ids is None else 1
        _, ids = index.search(self.queries, self.k + extra)
        r = per_query_recall(drop_self(ids, self.self_ids, self.k), self.truth)
        se = r.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else 0.0
        return float(r.mean()), float(r.mean() - 2 * se)

    def qps(self, index: faiss.Index, batch: int) -> float:
        """Queries per second at this batch size (batch 1: one query per call).

        Runs for ``min_seconds`` (at least 5 single queries or one batch), checking the clock
        after every call, so a slow index (Flat over many vectors, or threads fighting for
        busy cores) costs no more time than a fast one.
        """
        q = self.queries[: max(batch, 1)]
        index.search(q[: min(len(q), 10)], self.k)  # warm up: first touches of the index pages
        done, t0 = 0, time.perf_counter()
        while True:
            if batch == 1:
                index.search(self.queries[done % len(self.queries)][None], self.k)
                done += 1
            else:
                index.search(q, self.k)
                done += len(q)
            elapsed = time.perf_counter() - t0
            if elapsed >= self.min_seconds and (batch > 1 or done >= 5):
                return done / elapsed


# ----------------------------------------------------------------------------- build


def _queries(emb: EmbeddingSet, queries: str | Path | np.ndarray | None, n_queries: int, rng):
    """(queries float32 (Q, d), self ids or None, description)."""
    if queries is None:
        ids = np.sort(rng.choice(emb.n, min(n_queries, emb.n), replace=False))
        return emb.take(ids), ids, f"{len(ids)} vectors sampled from the collection (self-matches excluded)"
    q = np.load(queries) if not isinstance(queries, np.ndarray) else queries
    if q.ndim != 2 or q.shape[1] != emb.d or len(q) == 0:
        raise BuildError(f"queries must be a non-empty (Q, {emb.d}) array, got shape {q.shape}")
    return np.ascontiguousarray(q, dtype=np.float32), None, f"{len(q)} held-out queries from {queries}"


def _new_index(
    cand: Candidate, emb: EmbeddingSet, rng, trained: faiss.Index | None, cache: dict
) -> faiss.Index:
    """A trained, empty index for ``cand``: a copy of ``trained`` when given, else its family's.

    ``cache`` lives for one build: a family keeps there what the next candidate can reuse
    (IVF: the k-means centroids of each ``nlist``).
    """
    if trained is not None:
        return faiss.clone_index(trained)

    def draw(rows: int) -> np.ndarray:  # (rows, d) float32, a random sample; rows 0: all
        return emb.take(np.sort(rng.choice(emb.n, min(rows or emb.n, emb.n), replace=False)))

    return family(cand.family).new_index(cand, emb.d, draw, cache)


def _attempt(cand, emb, ev, target, rng, trained, centroids, log, add_all) -> dict[str, Any]:
    t0 = time.perf_counter()
    fam = family(cand.family)
    index = _new_index(cand, emb, rng, trained, centroids)
    trained_bytes = faiss.serialize_index(index).tobytes() if fam.shares_training else b""
    t1 = time.perf_counter()
    index = add_all(index, cand)
    t2 = time.perf_counter()
    params, (recall, bound), curve = fam.tune(index, ev, target)
    t3 = time.perf_counter()
    log(
        f"{cand.key}: recall@{ev.k} {recall:.4f} (>= {bound:.4f}) at {params or 'exact search'} "
        f"(train {t1 - t0:.1f} s, add {t2 - t1:.1f} s, tune {t3 - t2:.1f} s)"
    )
    return {
        "cand": cand,
        "index": index,
        "trained_bytes": trained_bytes,
        "params": params,
        "recall": recall,
        "bound": bound,
        "curve": curve,
        "reached": bound >= target,
        "times": {"train_s": round(t1 - t0, 2), "add_s": round(t2 - t1, 2), "tune_s": round(t3 - t2, 2)},
    }


def _search_candidates(cands, compare: int, emb, ev, target, rng, trained, log, add_all) -> dict[str, Any]:
    """Build candidates in order until one reaches ``target`` in each of ``compare`` structures.

    A candidate is skipped when its structure (flat, hnsw, ivf: ``Candidate.structure``)
    already reached the target, or already missed it with codes at least as fine (coarser
    codes cannot do better). Among those reaching the target the one with the most queries/s
    at batch 1 wins; if none does, the best recall.
    """
    best, tried, reached, missed, centroids = None, [], set(), {}, {}
    for cand in cands:
        if cand.structure in reached or missed.get(cand.structure, -1) >= cand.code_bytes:
            continue
        att = _attempt(cand, emb, ev, target, rng, trained, centroids, log, add_all)
        if att["reached"]:
            reached.add(cand.structure)
            if compare > 1:
                att["qps1"] = ev.qps(att["index"], 1)
        else:
            missed[cand.structure] = max(missed.get(cand.structure, -1), cand.code_bytes)
        tried.append(
            {
                "key": cand.key,
                "recall": round(att["recall"], 4),
                "search_params": att["params"],
                **att["times"],
                **({"qps_batch1": round(att["qps1"], 1)} if "qps1" in att else {}),
            }
        )
        rank = (att["reached"], att.get("qps1", 0.0), att["recall"])
        if best is None or rank > (best["reached"], best.get("qps1", 0.0), best["recall"]):
            best = att  # the previous best (and its index) is freed here
        if len(reached) >= compare:
            break
    assert best is not None
    return best | {"tried": tried}


def _candidates(emb: EmbeddingSet, budget: int, key: str | None, shard_rows: int):
    if key:
        cand = choose.estimate(key, emb.n, emb.d, shard_rows)
        over = [] if cand.index_bytes <= budget else [(cand, "over budget, but asked for with --key")]
        return [cand], over, 1
    plan = choose.plan(emb.n, emb.d, budget, shard_rows)
    return plan.candidates, plan.rejected, plan.compare_families


def build_index(
    emb_dir: str | Path,
    out_dir: str | Path,
    *,
    memory: str | int = "512MB",
    target_recall: float = 0.95,
    k: int = 10,
    n_queries: int = 1000,
    queries: str | Path | np.ndarray | None = None,
    key: str | None = None,
    trained: str | Path | None = None,
    seed: int = 0,
    speed_seconds: float = 0.15,
    fill_plan: FillPlan = ONE_PROCESS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build, tune and write an index for the export in ``emb_dir``; returns the report.

    ``fill_plan``: add in this process (the default) or per partition on an engine; its
    ``on_disk`` is set here, per candidate, from the budget.
    """
    t_start, rss_at_start = time.perf_counter(), rss_bytes("VmRSS")
    if not 0 < target_recall <= 1 or k < 1 or n_queries < 1:
        raise BuildError(
            f"need 0 < target recall <= 1, k >= 1, queries >= 1 (got {target_recall}, {k}, {n_queries})"
        )
    emb = EmbeddingSet(emb_dir)
    if emb.n == 0:
        raise BuildError(f"{emb_dir} holds no embeddings")
    budget = choose.parse_memory(memory)
    rng = np.random.default_rng(seed)
    trained_index, trained_key = _read_trained(trained, emb.d)
    if trained_key and key and key != trained_key:
        raise BuildError(f"--key {key} differs from the --trained index's key {trained_key}")
    cands, rejected, compare = _candidates(emb, budget, trained_key or key, max(emb.part_rows))
    q, self_ids, q_note = _queries(emb, queries, n_queries, rng)
    t0 = time.perf_counter()
    truth = drop_self(exact_knn(emb, q, k + (self_ids is not None)), self_ids, k)
    gt_s = time.perf_counter() - t0
    ev = Evaluator(q, truth, k, self_ids, min_seconds=speed_seconds)
    out = Path(out_dir)

    def add_all(index: faiss.Index, cand: Candidate) -> faiss.Index:
        over = cand.index_bytes > budget  # only a forced key gets here over the budget
        if over and not ondisk.plain_ivf(index):
            log(f"{cand.key}: over the budget, but only plain IVF lists can go on disk; kept in memory")
        plan = replace(fill_plan, on_disk=over and ondisk.plain_ivf(index))
        return fill(index, cand, emb, out, plan, budget, log)

    best = _search_candidates(cands, compare, emb, ev, target_recall, rng, trained_index, log, add_all)
    context = {"rejected": rejected, "budget": budget, "target": target_recall, "queries": q_note,
               "ground_truth_s": gt_s, "t_start": t_start, "rss_at_start": rss_at_start}  # fmt: skip
    return _finish(emb, out, best, ev, context, log)


def _read_trained(trained: str | Path | None, d: int) -> tuple[faiss.Index | None, str]:
    """(trained empty index, its key) from a build folder, or (None, "")."""
    if trained is None:
        return None, ""
    folder = Path(trained)
    if not (folder / TRAINED_FILE).is_file() or not (folder / REPORT_FILE).is_file():
        raise BuildError(
            f"--trained {trained}: not a build folder with {TRAINED_FILE} and {REPORT_FILE} "
            "(only IVF builds write a trained index)"
        )
    index = faiss.read_index(str(folder / TRAINED_FILE))
    if index.d != d:
        raise BuildError(f"--trained {trained} is for {index.d}-d vectors; these embeddings are {d}-d")
    return index, json.loads((folder / REPORT_FILE).read_text())["index_key"]


def remove_leftovers(out: Path, data_file: str) -> None:
    """Data files of older builds in ``out`` and work folders of interrupted partitioned ones."""
    ondisk.remove_stale(out, data_file)
    for work in out.glob(WORK_PREFIX + "*"):
        shutil.rmtree(work, ignore_errors=True)


def _finish(emb: EmbeddingSet, out: Path, best: dict, ev: Evaluator, ctx: dict, log) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cand, index = best["cand"], best["index"]
    data_file = ondisk.data_file(index)  # "" when the lists are in memory
    write_index(index, out / INDEX_FILE)  # the commit point: it names its data file
    if best["trained_bytes"]:
        with atomic_open(out / TRAINED_FILE) as f:
            f.write(best["trained_bytes"])
    else:  # a Flat or HNSW build over an older IVF build in the same folder
        (out / TRAINED_FILE).unlink(missing_ok=True)
    meta = emb.metadata()
    meta = meta.add_column(0, "id", pa.array(np.arange(meta.num_rows, dtype=np.int64)))
    with atomic_open(out / META_FILE) as f:
        pq.write_table(meta, f)
    build_s = time.perf_counter() - ctx["t_start"]
    qps1, qps_many = best.get("qps1") or ev.qps(index, 1), ev.qps(index, 1000)
    report = {
        "index_key": cand.key,
        "family": cand.family,
        "metric": "inner_product",
        "dim": emb.d,
        "ntotal": int(index.ntotal),
        "model": emb.info.get("model", ""),
        "modality": emb.info.get("modality", ""),
        "embeddings": str(emb.root.resolve()),
        "search_params": best["params"],
        "k": ev.k,
        f"recall_at_{ev.k}": round(best["recall"], 4),
        "recall_lower_bound": round(best["bound"], 4),  # mean - 2 standard errors; tuned to >= target
        "target_recall": ctx["target"],
        "target_reached": bool(best["reached"]),
        "qps_batch1": round(qps1, 1),
        "qps_batch1000": round(qps_many, 1),
        "batch_of_many": min(1000, len(ev.queries)),
        "threads": faiss.omp_get_max_threads(),
        "size_bytes": (out / INDEX_FILE).stat().st_size,
        **({"ivfdata": data_file, "ivfdata_bytes": (out / data_file).stat().st_size} if data_file else {}),
        "estimated_bytes": cand.index_bytes,
        "estimated_build_peak_bytes": cand.build_peak_bytes,
        "process_peak_rss_bytes": rss_bytes("VmHWM"),
        "process_rss_at_start_bytes": ctx["rss_at_start"],  # libraries etc.; the estimates exclude it
        "memory_budget_bytes": ctx["budget"],
        "build_time_s": round(build_s, 2),
        "ground_truth_s": round(ctx["ground_truth_s"], 2),
        "queries": ctx["queries"],
        "tuning_curve": best["curve"],
        "tried": best["tried"],
        "rejected": [{"key": c.key, "why": why} for c, why in ctx["rejected"]],
        "trained_sha256": hashlib.sha256(best["trained_bytes"]).hexdigest() if best["trained_bytes"] else "",
    }
    write_json(out / REPORT_FILE, report)
    remove_leftovers(out, data_file)
    if not best["reached"]:
        log(
            f"warning: no index within the budget reached recall@{ev.k} {ctx['target']}; kept {cand.key} at "
            f"{best['recall']:.4f} (a larger --memory allows finer codes)"
        )
    return report
