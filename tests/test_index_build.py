"""Building, loading, searching and merging indexes, each against a brute-force numpy oracle."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from index_helpers import clustered, write_vectors

from clipkit.index import choose
from clipkit.index.build import BuildError, _new_index, build_index, per_query_recall
from clipkit.index.families import set_search_params
from clipkit.index.merge import MergeError, merge_indexes
from clipkit.index.search import SearchIndex, SearchIndexError, UnknownKeyError
from clipkit.index.store import EmbeddingsError, EmbeddingSet

QUIET = {"speed_seconds": 0.01, "log": lambda _: None}


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ x.T  # (Q, n)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, 1)


def numpy_recall(index, x, q_ids, k, nprobe, param="nprobe"):
    """Per-query recall@k of ``index`` at ``nprobe`` on queries x[q_ids], self-matches excluded."""
    set_search_params(index, {param: nprobe})
    q = x[q_ids]
    truth, _ = numpy_topk(x, q, k + 1)
    _, found = index.search(q, k + 1)
    hits = []
    for qi, t, f in zip(q_ids, truth, found):
        t, f = [i for i in t if i != qi][:k], [i for i in f if i != qi][:k]
        hits.append(len(set(t) & set(f)) / k)
    return np.array(hits)


def lower_bound(r: np.ndarray) -> float:
    return float(r.mean() - 2 * r.std(ddof=1) / np.sqrt(len(r)))


def test_flat_results_equal_numpy_argsort(tmp_path):
    x = np.random.default_rng(1).standard_normal((700, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_vectors(tmp_path / "emb", x, part_rows=300)
    report = build_index(tmp_path / "emb", tmp_path / "idx", **QUIET)
    assert report["index_key"] == "Flat" and report["recall_at_10"] == 1.0
    q = np.random.default_rng(2).standard_normal((20, 24)).astype(np.float32)
    index = SearchIndex(tmp_path / "idx")
    ids, scores = numpy_topk(x, q, 10)
    got = index.search(q, 10)
    assert [[r["id"] for r in rows] for rows in got] == ids.tolist()
    np.testing.assert_allclose([[r["score"] for r in rows] for rows in got], scores, atol=1e-5)
    assert got[0][0]["key"] == f"v{ids[0, 0]:06d}" and got[0][0]["caption"] == f"vector {ids[0, 0]}"


def test_ivf_is_tuned_to_the_smallest_nprobe_reaching_the_target(tmp_path):
    x = clustered(4000, 16, clusters=30, noise=0.9)
    write_vectors(tmp_path / "emb", x, part_rows=1000)
    report = build_index(tmp_path / "emb", tmp_path / "idx", key="IVF32,Flat", target_recall=0.9,
                         n_queries=300, **QUIET)  # fmt: skip
    nprobe = report["search_params"]["nprobe"]
    assert report["target_reached"] and 1 < nprobe < 32
    index = faiss.read_index(str(tmp_path / "idx" / "index.faiss"))
    # The queries are the 300 ids the builder sampled (seed 0); recompute recall with numpy.
    q_ids = np.sort(np.random.default_rng(0).choice(4000, 300, replace=False))
    chosen = numpy_recall(index, x, q_ids, 10, nprobe)
    assert chosen.mean() == pytest.approx(report["recall_at_10"], abs=5e-5)
    # Tuned so that even the lower confidence bound (mean - 2 s.e.) reaches the target ...
    assert lower_bound(chosen) == pytest.approx(report["recall_lower_bound"], abs=5e-5)
    assert lower_bound(chosen) >= 0.9
    assert lower_bound(numpy_recall(index, x, q_ids, 10, nprobe - 1)) < 0.9  # ... and minimal
    curve = dict(map(tuple, report["tuning_curve"]))
    assert curve[nprobe] == report["recall_at_10"]


def test_ivf_sq8_with_held_out_queries_file(tmp_path):
    x = clustered(5000, 32, clusters=40, noise=0.6, seed=3)
    write_vectors(tmp_path / "emb", x[:4800], part_rows=1600)
    np.save(tmp_path / "q.npy", x[4800:])
    report = build_index(tmp_path / "emb", tmp_path / "idx", key="IVF64,SQ8", queries=tmp_path / "q.npy",
                         target_recall=0.85, **QUIET)  # fmt: skip
    index = faiss.read_index(str(tmp_path / "idx" / "index.faiss"))
    truth, _ = numpy_topk(x[:4800], x[4800:], 10)
    _, found = index.search(x[4800:], 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    assert recall == pytest.approx(report["recall_at_10"], abs=5e-5) and recall >= 0.85
    assert report["queries"].startswith("200 held-out queries")
    np.save(tmp_path / "bad.npy", x[:10, :16])
    with pytest.raises(BuildError, match=r"\(Q, 32\) array, got shape \(10, 16\)"):
        build_index(tmp_path / "emb", tmp_path / "idx2", queries=tmp_path / "bad.npy", **QUIET)


def test_outputs_are_complete_and_consistent(tmp_path):
    x = clustered(3000, 16, seed=4)
    write_vectors(tmp_path / "emb", x, part_rows=1000)
    report = build_index(tmp_path / "emb", tmp_path / "idx", key="IVF16,SQ8", **QUIET)
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["index.faiss", "metadata.parquet", "report.json", "trained.faiss"]  # no temporaries
    meta = pq.read_table(tmp_path / "idx" / "metadata.parquet")
    assert meta.column("id").to_pylist() == list(range(3000))
    assert meta.column("key").to_pylist()[1234] == "v001234"
    on_disk = json.loads((tmp_path / "idx" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for field in ("index_key", "size_bytes", "build_time_s", "recall_at_10", "qps_batch1", "qps_batch1000"):
        assert on_disk[field], field
    assert on_disk["size_bytes"] == (tmp_path / "idx" / "index.faiss").stat().st_size


def test_mmap_load_maps_the_file_and_answers_the_same(tmp_path):
    x = clustered(3000, 16, seed=5)
    write_vectors(tmp_path / "emb", x, part_rows=1000)
    build_index(tmp_path / "emb", tmp_path / "idx", key="IVF16,Flat", **QUIET)
    path = str((tmp_path / "idx" / "index.faiss").resolve())
    mapped = SearchIndex(tmp_path / "idx", mmap=True)
    with open("/proc/self/maps") as f:
        assert path in f.read()  # the codes are paged from the file, not copied in
    loaded = SearchIndex(tmp_path / "idx", mmap=False)
    q = x[:50]
    assert mapped.search(q, 10) == loaded.search(q, 10)
    assert (
        mapped.index.nprobe
        == json.loads((tmp_path / "idx" / "report.json").read_text())["search_params"]["nprobe"]
    )


def test_neighbours_by_key_and_unknown_key(tmp_path):
    x = clustered(800, 16, seed=6)
    write_vectors(tmp_path / "emb", x, part_rows=300)
    build_index(tmp_path / "emb", tmp_path / "idx", **QUIET)
    index = SearchIndex(tmp_path / "idx")
    ids, _ = numpy_topk(x, x[17:18], 6)
    assert [r["id"] for r in index.neighbours("v000017", 5)] == [i for i in ids[0] if i != 17][:5]
    with pytest.raises(UnknownKeyError, match="unknown key 'v999999'"):
        index.neighbours("v999999", 5)


def test_broken_index_folders_are_refused(tmp_path):
    x = clustered(600, 16, seed=7)
    write_vectors(tmp_path / "emb", x, part_rows=300)
    build_index(tmp_path / "emb", tmp_path / "a", **QUIET)
    write_vectors(tmp_path / "emb2", x[:500], part_rows=300)
    build_index(tmp_path / "emb2", tmp_path / "b", **QUIET)
    with pytest.raises(SearchIndexError, match="16-d embeddings of model 'synthetic'.* embeds to 32-d"):
        SearchIndex(tmp_path / "a").check_model(32, "other")
    shutil.copy(tmp_path / "b" / "metadata.parquet", tmp_path / "a" / "metadata.parquet")
    with pytest.raises(SearchIndexError, match="has 500 rows but index.faiss holds 600 vectors"):
        SearchIndex(tmp_path / "a")
    shutil.copy(tmp_path / "b" / "index.faiss", tmp_path / "a" / "index.faiss")
    with pytest.raises(SearchIndexError, match="from different builds"):
        SearchIndex(tmp_path / "a")  # report.json still says 600
    (tmp_path / "b" / "report.json").unlink()
    with pytest.raises(SearchIndexError, match="report.json missing"):
        SearchIndex(tmp_path / "b")
    with pytest.raises(EmbeddingsError, match="not an output folder of `clipkit index embed`"):
        build_index(tmp_path / "a", tmp_path / "c", **QUIET)


def split_exports(tmp_path, x, cut):
    write_vectors(tmp_path / "all", x, part_rows=500)
    write_vectors(tmp_path / "first", x[:cut], part_rows=500)
    # The second export's keys continue the first's, as two embed runs over two shard sets would.
    second = write_vectors(tmp_path / "second", x[cut:], part_rows=500, key_prefix="w")
    return second


def test_merge_of_ivf_parts_equals_one_build_on_everything(tmp_path):
    x = clustered(3000, 16, clusters=20, seed=8)
    split_exports(tmp_path, x, 1800)
    build_index(tmp_path / "all", tmp_path / "full", key="IVF16,SQ8", **QUIET)
    build_index(tmp_path / "first", tmp_path / "A", trained=tmp_path / "full", **QUIET)
    build_index(tmp_path / "second", tmp_path / "B", trained=tmp_path / "full", **QUIET)
    report = merge_indexes([tmp_path / "A", tmp_path / "B"], tmp_path / "AB", log=lambda _: None)
    assert report["ntotal"] == 3000
    merged, full = SearchIndex(tmp_path / "AB"), SearchIndex(tmp_path / "full")
    set_search_params(full.index, {"nprobe": 4})
    set_search_params(merged.index, {"nprobe": 4})
    q = clustered(40, 16, clusters=20, seed=9)
    strip = lambda res: [[(r["id"], r["score"]) for r in rows] for rows in res]
    assert strip(merged.search(q, 10)) == strip(full.search(q, 10))
    # Metadata follows: ids past the first part are the second export's rows.
    assert merged.rows([1800])[0]["key"] == "w000000"


def test_merge_of_flat_parts_equals_one_flat_build(tmp_path):
    x = clustered(900, 16, seed=10)
    split_exports(tmp_path, x, 400)
    for name in ("all", "first", "second"):
        build_index(tmp_path / name, tmp_path / f"idx_{name}", **QUIET)
    merge_indexes([tmp_path / "idx_first", tmp_path / "idx_second"], tmp_path / "m", log=lambda _: None)
    q = x[:30]
    strip = lambda res: [[r["id"] for r in rows] for rows in res]
    assert strip(SearchIndex(tmp_path / "m").search(q, 10)) == strip(
        SearchIndex(tmp_path / "idx_all").search(q, 10)
    )


def test_merge_refuses_separately_trained_or_mismatched_indexes(tmp_path):
    x = clustered(3000, 16, seed=11)
    split_exports(tmp_path, x, 1500)
    build_index(tmp_path / "first", tmp_path / "A", key="IVF16,Flat", **QUIET)
    build_index(tmp_path / "second", tmp_path / "B", key="IVF16,Flat", seed=1, **QUIET)
    with pytest.raises(MergeError, match="trained separately .* --trained"):
        merge_indexes([tmp_path / "A", tmp_path / "B"], tmp_path / "AB", log=lambda _: None)
    build_index(tmp_path / "second", tmp_path / "C", key="IVF16,SQ8", **QUIET)
    with pytest.raises(MergeError, match="index_key differs"):
        merge_indexes([tmp_path / "A", tmp_path / "C"], tmp_path / "AC", log=lambda _: None)


def test_hnsw_is_tuned_on_ef_search(tmp_path):
    x = clustered(3000, 16, clusters=20, noise=0.9, seed=12)
    write_vectors(tmp_path / "emb", x, part_rows=1000)
    report = build_index(
        tmp_path / "emb", tmp_path / "idx", key="HNSW16", target_recall=0.9, n_queries=300, **QUIET
    )
    ef = report["search_params"]["efSearch"]
    assert report["family"] == "hnsw" and report["target_reached"] and ef >= 16
    assert faiss.downcast_index(SearchIndex(tmp_path / "idx").index).hnsw.efSearch == ef  # applied on load
    index = faiss.read_index(str(tmp_path / "idx" / "index.faiss"))
    q_ids = np.sort(np.random.default_rng(0).choice(3000, 300, replace=False))
    chosen = numpy_recall(index, x, q_ids, 10, ef, "efSearch")
    assert chosen.mean() == pytest.approx(report["recall_at_10"], abs=5e-5)
    assert lower_bound(chosen) >= 0.9


def test_mid_size_builds_each_family_and_keeps_the_fastest(tmp_path, monkeypatch):
    monkeypatch.setattr(choose, "EXACT_ONLY_N", 1000)  # shrink the bands to test size
    x = clustered(3000, 16, clusters=20, noise=0.8, seed=13)
    write_vectors(tmp_path / "emb", x, part_rows=1000)
    report = build_index(tmp_path / "emb", tmp_path / "idx", target_recall=0.9, n_queries=200, **QUIET)
    tried = {t["key"]: t for t in report["tried"]}
    # the first candidate of each structure: the inverted lists' is the fast-scan re-rank
    assert set(tried) == {"Flat", "HNSW32", "IVF32,PQ8x4fsr,Refine(SQfp16)"}
    reached = [t for t in tried.values() if "qps_batch1" in t]
    assert report["index_key"] == max(reached, key=lambda t: t["qps_batch1"])["key"]


def test_per_query_recall_equals_set_intersection():
    rng = np.random.default_rng(15)
    truth = np.stack([rng.permutation(30)[:10] for _ in range(200)])
    found = np.stack([rng.permutation(30)[:10] for _ in range(200)])
    truth[:20, 7:] = -1  # fewer than k true neighbours (tiny collections)
    found[10:40, 5:] = -1  # FAISS pads short result lists with -1
    want = [len(set(t[t >= 0]) & set(f[f >= 0])) / (t >= 0).sum() for t, f in zip(truth, found)]
    np.testing.assert_allclose(per_query_recall(found, truth), want)


def test_ivf_candidates_with_the_same_lists_share_their_k_means(tmp_path):
    x = clustered(3000, 16, seed=14)
    write_vectors(tmp_path / "emb", x, part_rows=1000)
    emb, centroids, rng = EmbeddingSet(tmp_path / "emb"), {}, np.random.default_rng(0)

    def coarse(key, cache):
        index = _new_index(choose.estimate(key, 3000, 16), emb, rng, None, cache)
        assert index.is_trained
        return faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 16)

    sq8 = coarse("IVF16,SQ8", centroids)
    np.testing.assert_array_equal(coarse("IVF16,Flat", centroids), sq8)  # trained once
    assert not np.allclose(coarse("IVF16,Flat", {}), sq8)  # k-means on a new sample lands elsewhere
