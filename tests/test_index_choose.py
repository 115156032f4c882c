"""The index chooser: decisions for several (n, d, budget) cases, and honest size estimates."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from clipkit.index import choose
from clipkit.index.families.ivf_refine import fast_scan_nlist


def keys(n, d, budget):
    return [c.key for c in choose.plan(n, d, choose.parse_memory(budget)).candidates]


def test_parse_memory():
    assert choose.parse_memory("512MB") == 512 * 2**20
    assert choose.parse_memory("1.5G") == int(1.5 * 2**30)
    assert choose.parse_memory("300MiB") == 300 * 2**20
    assert choose.parse_memory("4096") == 4096
    for bad in ("", "lots", "-1MB", "0"):
        with pytest.raises(choose.IndexChoiceError, match="memory size"):
            choose.parse_memory(bad)


def test_small_collections_are_searched_exactly():
    p = choose.plan(1_500, 256, choose.parse_memory("512MB"))
    assert p.candidates[0].key == "Flat" and p.compare_families == 1
    # ... unless Flat does not fit: 1,500 x 256 floats are 1.5 MiB. Then the inverted lists,
    # fastest first: the fast-scan re-ranks (on half IVF's lists), then IVF-SQ8.
    assert keys(1_500, 256, "1MB")[:3] == [
        "IVF16,PQ128x4fsr,Refine(SQfp16)", "IVF16,PQ128x4fsr,Refine(SQ8)", "IVF32,SQ8"
    ]  # fmt: skip


def test_mid_size_compares_flat_hnsw_and_ivf():
    p = choose.plan(11_000, 256, choose.parse_memory("512MB"))
    assert [c.key for c in p.candidates][:6] == [
        "Flat", "HNSW32", "IVF128,PQ128x4fsr,Refine(SQfp16)", "IVF128,PQ128x4fsr,Refine(SQ8)", "IVF256,SQ8",
        "IVF256,Flat",
    ]  # fmt: skip
    assert p.compare_families == 3
    p = choose.plan(60_000, 256, choose.parse_memory("1G"))
    assert [c.key for c in p.candidates][:5] == [
        "HNSW32", "IVF512,PQ128x4fsr,Refine(SQfp16)", "IVF512,PQ128x4fsr,Refine(SQ8)", "IVF1024,SQ8",
        "IVF1024,Flat",
    ]  # fmt: skip
    assert p.compare_families == 2
    # With 40 MB, neither the graph (~78 MB) nor IVF-Flat fits: the re-ranks (35 and 19 MB), SQ8,
    # then product codes.
    p = choose.plan(60_000, 256, choose.parse_memory("40MB"))
    assert [c.key for c in p.candidates][:4] == [
        "IVF512,PQ128x4fsr,Refine(SQfp16)",
        "IVF512,PQ128x4fsr,Refine(SQ8)",
        "IVF1024,SQ8",
        "IVF1024,PQ128",
    ]
    assert p.compare_families == 1
    assert {c.key for c, _ in p.rejected} == {"HNSW32", "IVF1024,Flat"}
    # With 30 MB the float16 re-rank does not fit, the 8-bit one does; with 18 MB neither: SQ8 first.
    assert keys(60_000, 256, "30MB")[:2] == ["IVF512,PQ128x4fsr,Refine(SQ8)", "IVF1024,SQ8"]
    assert keys(60_000, 256, "18MB")[0] == "IVF1024,SQ8"


def test_the_benchmark_case_1m_x_256_in_512mb():
    p = choose.plan(1_000_000, 256, choose.parse_memory("512MB"))
    got = [c.key for c in p.candidates]
    # Flat (1 GB), IVF-Flat and the float16 re-rank (560 MB) do not fit; the fast-scan lists with
    # an 8-bit re-rank (313 MiB) come first, then SQ8 (256 MB of codes), the most exact code of
    # the plain lists that does.
    assert got[:2] == ["IVF2048,PQ128x4fsr,Refine(SQ8)", "IVF4096,SQ8"]
    assert got[2:] == [
        "IVF4096,PQ128",
        "OPQ64,IVF4096,PQ64",
        "OPQ32,IVF4096,PQ32",
        "OPQ16,IVF4096,PQ16",
        "OPQ8,IVF4096,PQ8",
    ]
    assert {"IVF4096,Flat", "IVF2048,PQ128x4fsr,Refine(SQfp16)"} <= {c.key for c, _ in p.rejected}
    assert 250 * 2**20 < p.candidates[1].index_bytes < 270 * 2**20  # 1M x (256 B code + 8 B id)
    assert 310 * 2**20 < p.candidates[0].index_bytes < 320 * 2**20  # 1M x (64 + 256 + 8 B)


def test_more_budget_and_tighter_budgets():
    assert keys(1_000_000, 256, "2G")[:4] == [
        "IVF2048,PQ128x4fsr,Refine(SQfp16)",
        "IVF2048,PQ128x4fsr,Refine(SQ8)",
        "IVF4096,SQ8",
        "IVF4096,Flat",
    ]
    assert keys(1_000_000, 256, "100MB")[0] == "OPQ64,IVF4096,PQ64"
    assert keys(10_000_000, 768, "1G")[0] == "OPQ48,IVF16384,PQ48"
    with pytest.raises(
        choose.IndexChoiceError, match="no index of 100000000 x 256 vectors fits in 100.0 MiB"
    ):
        choose.plan(100_000_000, 256, choose.parse_memory("100MB"))


def test_nlist_rule():
    assert choose.ivf_nlist(1_000_000) == 4096
    assert choose.ivf_nlist(100_000) == 1024
    assert choose.ivf_nlist(30_000) == 512  # 4 sqrt(n) = 693 -> 512
    assert choose.ivf_nlist(1_000) == 16  # at least 40 training points per list, floor 16
    # The fast-scan re-rank: half the lists (2 sqrt(n)), same floor.
    assert [fast_scan_nlist(n) for n in (1_000_000, 300_000, 30_000, 1_000)] == [2048, 1024, 256, 16]


@pytest.mark.parametrize("key", ["Flat", "HNSW32", "IVF64,Flat", "IVF64,SQ8", "IVF64,PQ16", "OPQ8,IVF64,PQ8"])
def test_estimates_match_the_real_index(key):
    """Oracle: the serialized size of a real index of that key (what loading it costs)."""
    n, d = 6_000, 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    if key.startswith("OPQ"):
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = 2
    if "PQ" in key:  # only the sizes matter here: a quick, rough PQ training
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.do_polysemous_training = False
        ivf.pq.cp.niter = 2
    index.train(x[:2000] if "PQ" in key else x)
    index.add(x)
    real = len(faiss.serialize_index(index))
    est = choose.estimate(key, n, d).index_bytes
    assert abs(est - real) / real < 0.06, (key, est, real)


def test_unknown_key_is_refused():
    with pytest.raises(choose.IndexChoiceError, match="not one clipkit builds"):
        choose.estimate("LSH", 1000, 32)
    with pytest.raises(choose.IndexChoiceError, match="divisible"):
        choose.estimate("IVF64,PQ7", 1000, 32)
