"""Indexes with their inverted lists on disk: relocatable, merged, served, written atomically."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
import torch
from index_helpers import COLORS, clustered, color_model, write_vectors

from clipkit.cli.main import main
from clipkit.index import build as build_mod
from clipkit.index import ondisk
from clipkit.index.build import build_index
from clipkit.index.merge import merge_indexes
from clipkit.index.partition import FillPlan
from clipkit.index.search import SearchIndex, SearchIndexError

QUIET = {"speed_seconds": 0.01, "log": lambda _: None, "n_queries": 100}
KEY = "IVF16,Flat"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(vectors, export, in-memory build, on-disk build of the same training) over 1,200 vectors."""
    base = tmp_path_factory.mktemp("ondisk")
    x = clustered(1200, 16, clusters=20)
    root = write_vectors(base / "emb", x, part_rows=250)
    build_index(root, base / "mem", key=KEY, **QUIET)
    build_index(
        root, base / "disk", key=KEY, memory="1KB", fill_plan=FillPlan(partitions=3, workers=1), **QUIET
    )
    return x, root, base / "mem", base / "disk"


def results(folder, q, nprobe=16):
    index = SearchIndex(folder)
    index.index.nprobe = nprobe
    return index.index.search(q, 10)


def test_a_moved_folder_maps_its_lists_from_the_new_place(built, tmp_path, capfd):
    x, _, mem, disk = built
    moved = tmp_path / "elsewhere" / "idx"
    shutil.copytree(disk, moved)
    shutil.move(str(disk), str(tmp_path / "gone"))  # the path stored inside index.faiss no longer exists
    try:
        capfd.readouterr()
        d1, i1 = results(moved, x[:40])
        assert capfd.readouterr().out == ""  # nothing printed: `index query --json` stays parseable
        d0, i0 = results(mem, x[:40])
        np.testing.assert_array_equal(i1, i0)
        np.testing.assert_array_equal(d1, d0)
        loaded = SearchIndex(moved)  # kept alive: the lists below belong to its index
        lists = ondisk.lists_of(loaded.index)
        assert lists.read_only and lists.filename.startswith(str(moved.resolve()))
    finally:
        shutil.move(str(tmp_path / "gone"), str(disk))


def test_index_file_without_its_data_file_is_refused(built, tmp_path):
    _, _, _, disk = built
    partial = tmp_path / "partial"
    shutil.copytree(disk, partial)
    (partial / json.loads((partial / "report.json").read_text())["ivfdata"]).unlink()
    with pytest.raises(SearchIndexError, match="copy the whole index folder"):
        SearchIndex(partial)


def test_reconstruct_and_neighbours_by_key_on_disk(built):
    x, _, mem, disk = built
    a, b = SearchIndex(mem), SearchIndex(disk)
    np.testing.assert_array_equal(b.vector(17), a.vector(17))  # IVF-Flat stores x exactly
    np.testing.assert_allclose(b.vector(17), x[17], atol=1e-6)
    assert [r["id"] for r in b.neighbours("v000017", 5)] == [r["id"] for r in a.neighbours("v000017", 5)]


def test_merge_on_disk_equals_one_build(built, tmp_path):
    x, _, mem, _ = built
    first = write_vectors(tmp_path / "e1", x[:500], part_rows=250)
    second = write_vectors(tmp_path / "e2", x[500:], part_rows=250, key_prefix="w")
    build_index(first, tmp_path / "i1", key=KEY, trained=mem, **QUIET)
    build_index(second, tmp_path / "i2", key=KEY, trained=mem, memory="1KB", **QUIET)  # this part on disk
    report = merge_indexes([tmp_path / "i1", tmp_path / "i2"], tmp_path / "m", log=lambda _: None)
    assert report["ntotal"] == 1200 and report["ivfdata"]  # a part on disk: the merge is too
    d0, i0 = results(mem, x[:40])
    d1, i1 = results(tmp_path / "m", x[:40])
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(d1, d0)
    # Two in-memory parts over --memory are merged on disk; under it, in memory.
    build_index(second, tmp_path / "i3", key=KEY, trained=mem, **QUIET)
    on = merge_indexes([tmp_path / "i1", tmp_path / "i3"], tmp_path / "m2", memory="4KB", log=lambda _: None)
    off = merge_indexes([tmp_path / "i1", tmp_path / "i3"], tmp_path / "m3", memory="1GB", log=lambda _: None)
    assert on["ivfdata"] and "ivfdata" not in off
    for folder in ("m2", "m3"):
        np.testing.assert_array_equal(results(tmp_path / folder, x[:40])[1], i0)


def test_a_build_killed_before_its_commit_leaves_the_old_index_working(built, tmp_path, monkeypatch):
    x, root, _, disk = built
    folder = tmp_path / "idx"
    shutil.copytree(disk, folder)
    before = results(folder, x[:20])
    old_data = json.loads((folder / "report.json").read_text())["ivfdata"]

    def killed(index, path):
        raise KeyboardInterrupt  # dies after the new lists were written, before index.faiss is replaced

    monkeypatch.setattr(build_mod, "write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(root, folder, key=KEY, memory="1KB", seed=5, **QUIET)
    monkeypatch.undo()
    data_files = sorted(p.name for p in folder.glob("*.ivfdata"))
    assert len(data_files) == 2 and old_data in data_files  # the new one is written but unreferenced
    after = results(folder, x[:20])
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # The next build commits and removes the orphan and the old data file.
    report = build_index(root, folder, key=KEY, memory="1KB", **QUIET)
    assert [p.name for p in folder.glob("*.ivfdata")] == [report["ivfdata"]]
    assert not list(folder.glob(".partitions-*"))


def test_a_rebuild_in_memory_removes_the_old_data_file(built, tmp_path):
    _, root, _, disk = built
    folder = tmp_path / "idx"
    shutil.copytree(disk, folder)
    build_index(root, folder, key=KEY, memory="64MB", **QUIET)
    assert not list(folder.glob("*.ivfdata")) and SearchIndex(folder).ntotal == 1200


def test_ivf_refine_over_budget_stays_in_memory_with_a_note(tmp_path):
    x = clustered(1200, 16, clusters=20)
    root = write_vectors(tmp_path / "emb", x, part_rows=400)
    notes = []
    report = build_index(root, tmp_path / "idx", key="IVF16,PQ8x4fs,Refine(SQfp16)", memory="1KB",
                         fill_plan=FillPlan(partitions=2, workers=1), speed_seconds=0.01,
                         log=notes.append, n_queries=100)  # fmt: skip
    assert "ivfdata" not in report and any("only plain IVF lists can go on disk" in n for n in notes)
    assert SearchIndex(tmp_path / "idx").ntotal == 1200
    assert not ondisk.plain_ivf(faiss.read_index(str(tmp_path / "idx" / "index.faiss")))


def test_query_json_through_the_cli_on_an_on_disk_index(tmp_path, capfd):
    model = color_model()
    with torch.no_grad():  # 4 noisy copies of each colour's text embedding: ids 4c..4c+3 are colour c
        text = model.encode_text(model.tokenize([f"a {c} square" for c in COLORS])).numpy()
    x = np.repeat(text, 4, axis=0) + 0.01 * np.random.default_rng(0).standard_normal((40, 16)).astype(
        np.float32
    )
    emb, idx = (
        write_vectors(tmp_path / "emb", x / np.linalg.norm(x, axis=1, keepdims=True), 10),
        tmp_path / "idx",
    )
    assert main(["index", "build", str(emb), "--out", str(idx), "--key", "IVF2,Flat", "--memory", "1KB",
                 "--n-queries", "20", "--partitions", "2", "--workers", "1"]) == 0  # fmt: skip
    capfd.readouterr()
    argv = ["index", "query", str(idx), "--text", "a blue square", "--k", "3", "--json"]
    assert main([*argv, "--model", "index_helpers:color_model"]) == 0
    (result,) = json.loads(capfd.readouterr().out)  # stdout is JSON only
    assert [COLORS[int(r["key"][1:]) // 4] for r in result["results"]] == ["blue"] * 3
