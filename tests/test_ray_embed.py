"""``index embed --engine ray`` writes the local engine's export, through an actor killed mid-part,
and a rerun redoes only the parts that are not done."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from index_helpers import write_squares
from ray_helpers import KILL_DIR_ENV, start_cluster

from clipkit.cli.main import main as cli
from clipkit.index.store import EmbeddingSet

MODEL = "ray_helpers:dying_color_model"  # dies once, at its second batch, inside a Ray worker only


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    kills = tmp_path_factory.mktemp("ray_kills")
    ray = start_cluster(kills)
    yield kills
    ray.shutdown()


def embed(folder: Path, out: Path, *extra: str) -> int:
    argv = ["index", "embed", "--model", MODEL, "--folder", str(folder), "--out", str(out), "--part-size", "7",
            "--batch-size", "3", "--dtype", "float32", *extra]  # fmt: skip
    return cli(argv)


def assert_same_export(a: Path, b: Path) -> None:
    """Same files; vectors within 1e-6, metadata tables, configs and part markers equal."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for name in ("embed_config.json", "embed_info.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())
    for part in sorted(p.stem for p in a.glob("part-*.npy")):
        va, vb = np.load(a / f"{part}.npy"), np.load(b / f"{part}.npy")
        assert va.shape == vb.shape and va.dtype == vb.dtype == np.float32
        np.testing.assert_allclose(va, vb, rtol=0, atol=1e-6)
        assert pq.read_table(a / f"{part}.parquet").equals(pq.read_table(b / f"{part}.parquet"))
        ma, mb = (json.loads((d / f"{part}.json").read_text()) for d in (a, b))
        assert (ma["rows"], ma["skipped"]) == (mb["rows"], mb["skipped"])


def test_actor_killed_mid_part_leaves_the_local_export_and_reruns_redo_only_missing_parts(tmp_path, cluster):
    folder = tmp_path / "images"
    keys = write_squares(folder)  # 30 squares, 5 parts of 7 (the last 3 items)
    (folder / "zz_broken.png").write_bytes(b"not a png")
    assert embed(folder, tmp_path / "local") == 0
    assert embed(folder, tmp_path / "ray", "--engine", "ray") == 0
    assert (cluster / "embed").exists()  # an actor died after its first batch of a part
    assert_same_export(tmp_path / "local", tmp_path / "ray")
    emb = EmbeddingSet(tmp_path / "ray")
    assert emb.n == 30 and emb.info["skipped"] == {"decode_error": 1}
    assert sorted(emb.metadata().column("key").to_pylist()) == keys  # no row lost, none twice

    marker = tmp_path / "ray" / "part-00002.json"
    kept = (tmp_path / "ray" / "part-00001.npy").stat().st_mtime_ns
    marker.unlink()
    assert embed(folder, tmp_path / "ray", "--engine", "ray") == 0
    assert marker.is_file() and (tmp_path / "ray" / "part-00001.npy").stat().st_mtime_ns == kept
    assert_same_export(tmp_path / "local", tmp_path / "ray")


def test_gpu_actors_need_gpus(tmp_path, cluster, capsys):
    write_squares(tmp_path / "images", shades=1)
    assert embed(tmp_path / "images", tmp_path / "o", "--engine", "ray", "--gpus-per-actor", "1") == 2
    assert "--gpus-per-actor 1: the Ray cluster has 0 GPUs" in capsys.readouterr().err
    assert embed(tmp_path / "images", tmp_path / "o", "--gpus-per-actor", "1") == 2
    assert "add --engine ray" in capsys.readouterr().err
    assert KILL_DIR_ENV not in os.environ  # the model dies in Ray workers only
