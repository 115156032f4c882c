"""Partitioned adds (process pool, Ray) and on-disk lists give the one-process build's results."""

from __future__ import annotations

import numpy as np
import pytest
from index_helpers import clustered, write_vectors

from clipkit.cli.main import main
from clipkit.index.build import build_index
from clipkit.index.partition import FillPlan, PartitionError, split_parts
from clipkit.index.search import SearchIndex

QUIET = {"speed_seconds": 0.01, "log": lambda _: None, "n_queries": 200}
KEY = "IVF32,Flat"


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    """3,000 clustered 16-d vectors in 10 parts of unequal size (the last one short)."""
    x = clustered(3000, 16, clusters=30, noise=0.9)
    return write_vectors(tmp_path_factory.mktemp("emb") / "emb", x, part_rows=320)


def search_all(folder, q, k=10, nprobe=None):
    index = SearchIndex(folder)
    if nprobe:
        index.index.nprobe = nprobe
    dist, ids = index.index.search(q, k)
    return index, dist, ids


def test_split_parts_is_contiguous_balanced_and_complete():
    rows = [100, 0, 100, 100, 100, 100, 100, 50, 0, 50]
    groups = split_parts(rows, 3)
    assert [i for g in groups for i in g] == [0, 2, 3, 4, 5, 6, 7, 9]  # every non-empty part, in order
    sums = [sum(rows[i] for i in g) for g in groups]
    assert len(groups) == 3 and max(sums) - min(sums) <= 100
    assert split_parts([5, 5], 8) == [[0], [1]]  # never more groups than parts
    assert split_parts([5, 5, 5], 1) == [[0, 1, 2]]


def test_partitioned_and_on_disk_builds_equal_the_one_process_build(emb, tmp_path):
    root = emb
    single = build_index(root, tmp_path / "single", key=KEY, memory="64MB", **QUIET)
    pool = build_index(root, tmp_path / "pool", key=KEY, memory="64MB",
                       fill_plan=FillPlan(partitions=3, workers=2), **QUIET)  # fmt: skip
    disk = build_index(root, tmp_path / "disk", key=KEY, memory="64KB",  # < 3000 x (64 + 8) bytes
                       fill_plan=FillPlan(partitions=2, workers=2), **QUIET)  # fmt: skip
    assert single["trained_sha256"] == pool["trained_sha256"] == disk["trained_sha256"]  # same quantizer
    assert "ivfdata" not in single and "ivfdata" not in pool
    assert disk["ivfdata"].endswith(".ivfdata") and disk["ivfdata_bytes"] >= 3000 * (16 * 4 + 8)
    assert disk["size_bytes"] < 16_000  # index.faiss holds the centroids, not the lists
    assert single["search_params"] == pool["search_params"] == disk["search_params"]
    q = clustered(50, 16, clusters=30, noise=0.9, seed=7)
    for nprobe in (1, 4, 32):
        _, d0, i0 = search_all(tmp_path / "single", q, nprobe=nprobe)
        for name in ("pool", "disk"):
            index, d1, i1 = search_all(tmp_path / name, q, nprobe=nprobe)
            np.testing.assert_array_equal(i1, i0)  # same ids, same order, ties included
            np.testing.assert_array_equal(d1, d0)  # bit-identical distances
    assert index.ntotal == 3000 and (i0 >= 0).all()
    # Nothing but the index files remains: the partition work folders are gone.
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == sorted(
        ["index.faiss", "trained.faiss", "metadata.parquet", "report.json", disk["ivfdata"]]
    )


def test_an_export_of_one_part_and_more_partitions_than_parts(tmp_path):
    x = clustered(900, 16, clusters=10)
    root = write_vectors(tmp_path / "emb", x, part_rows=1000)
    a = build_index(root, tmp_path / "a", key="IVF16,SQ8", **QUIET)
    b = build_index(root, tmp_path / "b", key="IVF16,SQ8", memory="1KB",
                    fill_plan=FillPlan(partitions=4, workers=1), **QUIET)  # fmt: skip
    assert "ivfdata" not in a and "ivfdata" in b
    np.testing.assert_array_equal(
        search_all(tmp_path / "a", x[:20])[2], search_all(tmp_path / "b", x[:20])[2]
    )


def test_bad_plans_are_refused():
    with pytest.raises(PartitionError, match="unknown engine 'spark'"):
        FillPlan(engine="spark")
    with pytest.raises(PartitionError, match="partitions >= 1"):
        FillPlan(partitions=0)


def test_cli_partitioned_on_disk_build(emb, tmp_path, capsys):
    root = emb
    out = tmp_path / "idx"
    argv = [
        "index",
        "build",
        str(root),
        "--out",
        str(out),
        "--key",
        KEY,
        "--memory",
        "64KB",
        "--n-queries",
        "100",
    ]
    assert main([*argv, "--partitions", "2", "--workers", "2"]) == 0
    assert "lists on disk: index." in capsys.readouterr().out
    assert SearchIndex(out).ntotal == 3000


def test_ray_engine_equals_the_local_pool(emb, tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional extra clipkit[ray]; `make test` installs it")
    root = emb
    local = build_index(
        root, tmp_path / "local", key=KEY, fill_plan=FillPlan(partitions=3, workers=2), **QUIET
    )
    ray = build_index(root, tmp_path / "ray", key=KEY, memory="64KB",
                      fill_plan=FillPlan(partitions=3, workers=2, engine="ray"), **QUIET)  # fmt: skip
    assert local["trained_sha256"] == ray["trained_sha256"] and "ivfdata" in ray
    q = clustered(30, 16, clusters=30, seed=3)
    _, d0, i0 = search_all(tmp_path / "local", q, nprobe=8)
    _, d1, i1 = search_all(tmp_path / "ray", q, nprobe=8)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(d1, d0)
