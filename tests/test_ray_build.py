"""``data build --engine ray`` writes the local engine's output byte for byte, through a worker
killed mid-shard and through a driver that died half-way (then ``--incremental``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from data_helpers import jpeg
from ray_helpers import FileFetcher, start_cluster

from clipkit.cli.main import main as cli
from clipkit.data.build import BuildOptions, build_shards, read_status
from clipkit.data.imageops import ImageOptions
from clipkit.data.shards import read_sizes
from clipkit.data.sources import open_source
from clipkit.data.tario import iter_samples

SHARD = 5  # items per shard: 22 items -> 5 shards, the last one short


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = start_cluster(tmp_path_factory.mktemp("ray_kills"))
    yield
    ray.shutdown()


def write_manifest(folder: Path, urls: bool) -> Path:
    """22 items over 5 shards: 2 captions for every third (``--captions each``: 2 samples),
    a missing file, an undecodable one, an empty caption, and images repeated within and
    across shards (``--dedup``). ``urls``: refer to the images as http://files/<path>."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(22):
        path = folder / f"img_{i:02d}.jpg"
        seed = {4: 3, 12: 3, 17: 8}.get(i, i)  # 4 and 12 repeat 3 (same / later shard), 17 repeats 8
        if i == 9:
            path.write_bytes(b"not a jpeg")
        elif i != 14:  # 14: missing
            path.write_bytes(
                jpeg((40 + i, 30), seed=seed) if seed == i else (folder / f"img_{seed:02d}.jpg").read_bytes()
            )
        ref = f"http://files{path}" if urls else str(path)
        rows.append(
            {"image": ref, "cap1": "" if i == 5 else f"item {i}", "cap2": f"again {i}" if i % 3 == 0 else ""}
        )
    manifest = folder / "pairs.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def options(**kw) -> BuildOptions:
    return BuildOptions(shard_size=SHARD, captions="each", dedup=True, image=ImageOptions(max_side=32), **kw)


def items(manifest: Path):
    return open_source(manifest, image_col="image", caption_cols=["cap1", "cap2"])[1]


def assert_same_build(a: Path, b: Path) -> None:
    """Every file byte-equal, bar ``_stats.json``'s elapsed_s; no temporary file left."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "_stats.json":
            sa, sb = (json.loads((d / name).read_text()) for d in (a, b))
            assert sa.pop("elapsed_s") >= 0 and sb.pop("elapsed_s") >= 0
            assert sa == sb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def assert_stats_add_up(out: Path, n_items: int) -> None:
    stats = json.loads((out / "_stats.json").read_text())
    sizes = read_sizes(out)
    keys, idx, rows = [], [], []
    for name in sorted(sizes):
        with open(out / name, "rb") as f:
            samples = list(iter_samples(f))
        assert len(samples) == sizes[name]
        keys += [s["__key__"] for s in samples]
        idx += [int(s["idx"]) for s in samples]
        rows += read_status(out / name.replace(".tar", ".parquet"))
    assert len(keys) == len(set(keys)) == stats["samples"] == sum(sizes.values())
    assert idx == list(range(len(idx)))  # contiguous across shards
    assert sorted(r["index"] for r in rows) == list(range(n_items)) == list(range(stats["items"]))
    statuses = Counter(r["status"] for r in rows)
    assert stats["ok"] == statuses.pop("ok") and stats["errors"] == dict(statuses)
    assert stats["shards"] == len(sizes) == -(-n_items // SHARD)


def test_worker_killed_mid_shard_leaves_the_local_engines_output(tmp_path, cluster):
    from clipkit.data.engines.ray_build import build_shards_ray

    manifest = write_manifest(tmp_path / "src", urls=True)
    local = build_shards(items(manifest), tmp_path / "local", options(fetch=FileFetcher()), source="m")
    marker = tmp_path / "killed"
    kill = FileFetcher(kill_url=f"http://files{tmp_path}/src/img_07.jpg", marker=str(marker))
    stats = build_shards_ray(items(manifest), tmp_path / "ray", options(fetch=kill, threads=2), source="m")
    assert marker.exists()  # the worker building shard 1 died with img_07 half-fetched
    assert_same_build(tmp_path / "local", tmp_path / "ray")
    assert_stats_add_up(tmp_path / "ray", 22)
    assert (
        stats["errors"]
        == local["errors"]
        == {"duplicate": 3, "http_404": 1, "decode_error": 1, "missing_caption": 1}
    )
    assert stats["samples"] == local["samples"] == 16 + 6  # 16 ok items, 6 of them with 2 captions


def test_incremental_after_a_dead_driver_builds_only_the_remaining_shards(tmp_path, cluster, capsys):
    from clipkit.data.engines.ray_build import build_shards_ray

    manifest = write_manifest(tmp_path / "src", urls=False)
    build_shards(items(manifest), tmp_path / "local", options(), source=str(manifest))

    class DriverDied(Exception):
        pass

    reports = []

    def die_after_two(report: dict) -> None:
        reports.append(report)
        if len(reports) == 2:
            raise DriverDied

    with pytest.raises(DriverDied):
        build_shards_ray(
            items(manifest), tmp_path / "ray", options(), source=str(manifest), progress=die_after_two
        )
    out = tmp_path / "ray"
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.*")}
    finished = {n[:12] for n in done if n.endswith(".tar") and n.replace(".tar", ".parquet") in done}
    assert len(finished) >= 2 and not (out / "_stats.json").exists()

    argv = ["data", "build", str(manifest), "--out", str(out), "--image-col", "image", "--caption-col", "cap1",
            "--caption-col", "cap2", "--captions", "each", "--dedup", "--max-side", "32", "--shard-size", str(SHARD),
            "--engine", "ray", "--incremental"]  # fmt: skip
    capsys.readouterr()
    assert cli(argv) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("shard-")]
    kept = {ln[:12] for ln in lines if ln.endswith("(kept from an earlier run)")}
    assert kept == finished and len(lines) == 5  # every shard once: kept or built
    assert all(
        done[f"{s}.{ext}"] == (out / f"{s}.{ext}").stat().st_mtime_ns
        for s in kept
        for ext in ("tar", "parquet")
    )
    assert_same_build(tmp_path / "local", out)
    assert_stats_add_up(out, 22)


def test_incremental_keeps_more_finished_shards_than_the_window(tmp_path, cluster):
    """Every shard finished and the window (2) smaller than the shard count (5): the kept shards
    are placed a window at a time, and the build must go on to the end of the source. It once
    stopped after the first window, and the end of the build then removed shards 2-4 as stale."""
    import shutil

    from clipkit.data.engines.ray_build import build_shards_ray

    manifest = write_manifest(tmp_path / "src", urls=False)
    local = tmp_path / "local"
    build_shards(items(manifest), local, options(), source=str(manifest))
    out = tmp_path / "ray"
    shutil.copytree(local, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.*")}
    stats = build_shards_ray(items(manifest), out, options(incremental=True), source=str(manifest), window=2)
    assert stats["shards"] == 5
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.*")} == before  # all kept, none rewritten
    assert_same_build(local, out)
    assert_stats_add_up(out, 22)


def test_engine_flags_are_checked(tmp_path, capsys):
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit):
        cli(["data", "build", str(tmp_path), "--out", out, "--engine", "spark"])
    assert cli(["data", "build", str(tmp_path), "--out", out, "--address", "auto"]) == 2
    assert "--address names a Ray cluster: add --engine ray" in capsys.readouterr().err
    assert cli(["data", "build", "emoji", "--out", out, "--engine", "ray"]) == 2
    assert "bundled source 'emoji' takes only --out, not --engine" in capsys.readouterr().err
