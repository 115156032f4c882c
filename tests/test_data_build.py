"""``data build``: every source kind, exact per-class error counts against a failing server, stable
keys and contiguous idx, resize modes and formats, atomic shards and incremental resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from data_helpers import FailingServer, encode, jpeg, noise_png, photo
from PIL import Image

from clipkit.cli.main import main as cli
from clipkit.data.build import BuildOptions, build_shards, read_status
from clipkit.data.captions import CaptionRules
from clipkit.data.download import Fetcher
from clipkit.data.imageops import ImageOptions
from clipkit.data.shards import read_sizes
from clipkit.data.sources import SourceError, open_source
from clipkit.data.tario import iter_samples, iter_tar

ROOT = Path(__file__).resolve().parents[1]


def read_dir(folder: Path) -> list[dict]:
    out = []
    for name in sorted(read_sizes(folder)):
        with open(folder / name, "rb") as f:
            out.extend(iter_samples(f))
    return out


def build(source, out, **kw) -> dict:
    _, items = open_source(
        source, **{k: kw.pop(k) for k in list(kw) if k in ("image_col", "caption_cols", "root", "splits")}
    )
    return build_shards(items, out, BuildOptions(**kw), source=str(source))


# ---------------------------------------------------------------------------- URL list vs failing server

# (route, how many, the error class it must be counted under; "ok" for successes)
PLAN = [
    ("ok", 5, "ok"), ("slow", 2, "ok"), ("flaky", 2, "ok"), ("status/404", 3, "http_404"),
    ("status/410", 1, "http_410"), ("status/500", 2, "http_500"), ("hang", 2, "timeout"),
    ("text", 2, "decode_error"), ("trunc", 2, "decode_error"), ("empty", 1, "empty_image"),
    ("tiny", 2, "too_small"),
]  # fmt: skip


@pytest.fixture(scope="module")
def web_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("web")
    # hang_s well past the client's timeout, and the timeout well past a local answer on a busy
    # 2-core CI machine (at 0.5 s a flaky URL's retry once timed out there)
    with FailingServer(hang_s=3.0) as srv:
        lines = []
        for route, n, _ in PLAN:
            for i in range(n):
                name = f"{route.replace('/', '_')}{i}.jpg"
                srv.images[name] = jpeg((12, 10), seed=i) if route == "tiny" else jpeg((200, 150), seed=i)
                path = (
                    f"ok/{name}"
                    if route == "tiny"
                    else (f"{route}/{name}" if "/" not in route else f"{route}")
                )
                lines.append(f"{srv.url(path)}?{route}~{i}\tcaption for {route} {i}")
        lines.insert(3, f"{srv.url('ok/never.jpg')}")  # no caption: not even downloaded
        lines.insert(7, "ftp://example.org/file.jpg\tan unsupported scheme")
        (out / "urls.txt").write_text("\n".join(lines) + "\n")
        opts = {
            "shard_size": 10,
            "threads": 8,
            "image": ImageOptions(max_side=64, min_side=16),
            "fetch": Fetcher(timeout=1.5, retries=1, backoff=0.01),
        }
        start = time.monotonic()
        stats = build(out / "urls.txt", out / "shards", **opts)
        elapsed = time.monotonic() - start
        hits = dict(srv.hits)
    return out, stats, hits, elapsed


def test_stats_match_the_failures_the_server_was_told_to_produce(web_build):
    _, stats, _, _ = web_build
    expected = Counter()
    for _, n, kind in PLAN:
        expected[kind] += n
    expected.update({"missing_caption": 1, "bad_url": 1})
    ok = expected.pop("ok")
    assert stats["ok"] == ok and stats["samples"] == ok
    assert stats["errors"] == dict(expected)
    assert stats["items"] == ok + sum(expected.values())


def test_requests_retries_and_time_bounds(web_build):
    _, _, hits, elapsed = web_build
    by_route = Counter()
    for path, n in hits.items():
        by_route[path.split("?")[-1].split("~")[0]] += n
    assert by_route["status/404"] == 3 and by_route["status/410"] == 1  # final at once
    assert by_route["status/500"] == 4 and by_route["hang"] == 4  # 2 URLs x (1 + 1 retry)
    assert by_route["flaky"] == 4  # 503 then ok, for each of 2
    assert not any("never.jpg" in p for p in hits)  # a caption-less item is not downloaded
    assert elapsed < 20  # hangs are cut by the timeout, concurrently


def test_per_shard_status_tables_and_sizes(web_build):
    out, stats, _, _ = web_build
    shards = out / "shards"
    rows = [r for p in sorted(shards.glob("shard-*.parquet")) for r in read_status(p)]
    assert [r["index"] for r in rows] == list(range(stats["items"]))
    assert Counter(r["status"] for r in rows)["ok"] == stats["ok"]
    bad = next(r for r in rows if r["status"] == "timeout")
    assert "1.5 s" in bad["error"] and bad["source"].endswith("hang~0")
    assert sum(read_sizes(shards).values()) == stats["samples"]
    assert json.loads((shards / "_stats.json").read_text())["errors"] == stats["errors"]
    samples = read_dir(shards)
    assert [int(s["idx"]) for s in samples] == list(range(stats["samples"]))  # contiguous
    ok_keys = [r["key"] for r in rows if r["status"] == "ok"]
    assert [s["__key__"] for s in samples] == ok_keys  # stable: the source position
    img = Image.open(io.BytesIO(samples[0]["jpg"]))
    assert max(img.size) == 64 and img.format == "JPEG"
    meta = json.loads(samples[0]["json"])
    assert meta["original_width"] == 200 and meta["source"].startswith("http://127.0.0.1")


# ---------------------------------------------------------------------------- folders and manifests


@pytest.fixture()
def folder(tmp_path) -> Path:
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for i in range(6):
        (src / ("sub" if i % 2 else "") / f"p{i}.jpg").write_bytes(jpeg((300, 200), seed=i))
        (src / ("sub" if i % 2 else "") / f"p{i}.txt").write_text(f"photo number {i}")
    (src / "alpha.png").write_bytes(encode(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), "PNG"))
    (src / "alpha.txt").write_text("a transparent square")
    return src


def test_folder_with_sidecar_captions(folder, tmp_path):
    stats = build(folder, tmp_path / "out", shard_size=3, image=ImageOptions(max_side=100))
    assert stats["ok"] == 7 and stats["errors"] == {} and stats["shards"] == 3
    samples = read_dir(tmp_path / "out")
    # Sorted by relative path: alpha.png, p0, p2, p4, then sub/p1, sub/p3, sub/p5.
    assert [s["txt"].decode() for s in samples][:2] == ["a transparent square", "photo number 0"]
    assert Image.open(io.BytesIO(samples[0]["jpg"])).getpixel((5, 5)) == (255, 255, 255)  # on white
    assert samples[-1]["txt"] == b"photo number 5"


def test_resize_modes_and_formats(tmp_path):
    src = tmp_path / "one"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg((400, 200)))
    (src / "a.txt").write_text("wide photo")
    sizes = {}
    for mode, fmt in [("keep_ratio", "jpg"), ("center_crop", "webp"), ("border", "png"), ("none", "jpg")]:
        build(src, tmp_path / mode, image=ImageOptions(mode, max_side=100, image_format=fmt, quality=80))
        (s,) = read_dir(tmp_path / mode)
        img = Image.open(io.BytesIO(s[fmt]))
        sizes[mode] = (img.size, img.format)
    assert sizes == {
        "keep_ratio": ((100, 50), "JPEG"),
        "center_crop": ((100, 100), "WEBP"),
        "border": ((100, 100), "PNG"),
        "none": ((400, 200), "JPEG"),
    }
    assert s["jpg"] == (src / "a.jpg").read_bytes()  # "none" + same format: bytes kept as they are
    (s,) = read_dir(tmp_path / "border")
    assert Image.open(io.BytesIO(s["png"])).getpixel((50, 2)) == (255, 255, 255)  # the border


def test_manifest_csv_tsv_parquet_jsonl_with_several_caption_columns(folder, tmp_path):
    rows = pd.DataFrame({
        "path": ["p0.jpg", "sub/p1.jpg", "missing.jpg", None],
        "title": ["first title", None, "t", "t"],
        "alt": ["first alt", "second alt", "a", "a"],
    })  # fmt: skip
    results = {}
    for suffix, write in [("csv", lambda p: rows.to_csv(p, index=False)),
                          ("tsv", lambda p: rows.to_csv(p, sep="\t", index=False)),
                          ("parquet", lambda p: rows.to_parquet(p)),
                          ("jsonl", lambda p: rows.to_json(p, orient="records", lines=True))]:  # fmt: skip
        manifest = folder / f"m.{suffix}"
        write(manifest)
        stats = build(
            manifest, tmp_path / suffix, image_col="path", caption_cols=["title", "alt"], captions="lines"
        )
        results[suffix] = (
            stats["ok"],
            stats["errors"],
            [s["txt"].decode() for s in read_dir(tmp_path / suffix)],
        )
    expected = (2, {"missing_file": 1, "missing_image": 1}, ["first title\nfirst alt", "second alt"])
    assert all(r == expected for r in results.values()), results


def test_manifest_missing_column_names_it_and_the_columns_present(folder, tmp_path):
    pd.DataFrame({"url": ["a.jpg"], "text": ["x"]}).to_csv(folder / "m.csv", index=False)
    with pytest.raises(SourceError, match=r"no caption column 'caption'; its columns are: url, text"):
        open_source(folder / "m.csv", image_col="url", caption_cols=["caption"])
    code = cli(["data", "build", str(folder / "m.csv"), "--image-col", "image", "--caption-col", "text",
                "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and not (tmp_path / "o").exists()  # refused before anything is written


def test_karpathy_json_each_first_and_lines(folder, tmp_path):
    doc = {"dataset": "coco", "images": [
        {"filepath": "", "filename": "p0.jpg", "split": "train", "sentences": [{"raw": "a cat"}, {"raw": "a pet"}]},
        {"filepath": "sub", "filename": "p1.jpg", "split": "val", "sentences": [{"raw": "val photo"}]},
        {"filepath": "", "filename": "p2.jpg", "split": "restval", "sentences": [{"raw": " "}, {"raw": "ok"}]},
        {"filepath": "", "filename": "p4.jpg", "split": "train", "sentences": []},
    ]}  # fmt: skip
    (folder / "captions.json").write_text(json.dumps(doc))
    splits = ["train", "restval"]
    each = build(folder / "captions.json", tmp_path / "each", splits=splits, captions="each")
    assert (each["ok"], each["samples"], each["errors"]) == (2, 3, {"missing_caption": 1})
    samples = read_dir(tmp_path / "each")
    assert [(s["__key__"], s["txt"].decode()) for s in samples] == [
        ("000000000_0", "a cat"), ("000000000_1", "a pet"), ("000000001", "ok")]  # fmt: skip
    assert [int(s["idx"]) for s in samples] == [0, 1, 2]
    first = build(folder / "captions.json", tmp_path / "first", splits=splits)
    assert [s["txt"] for s in read_dir(tmp_path / "first")] == [b"a cat", b"ok"] and first["samples"] == 2
    with pytest.raises(SourceError, match="splits present"):
        open_source(folder / "captions.json", splits=["test"])


def test_caption_rules_and_dedup_while_building(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    captions = ["a red bus in the city", "spam spam", "buy now cheap pills", "a dog", "same bus again"]
    for i, c in enumerate(captions):
        (src / f"{i}.jpg").write_bytes(jpeg(seed=0 if i in (0, 4) else i))  # 4 is a copy of 0
        (src / f"{i}.txt").write_text(c)
    rules = CaptionRules(min_words=3, blocklist=frozenset({"cheap pills"}))
    stats = build(src, tmp_path / "out", rules=rules, dedup=True)
    assert stats["errors"] == {"caption_too_short": 2, "caption_blocked": 1, "duplicate": 1}
    rows = read_status(tmp_path / "out" / "shard-000000.parquet")
    assert rows[4]["error"] == "same image as 000000000"


# ---------------------------------------------------------------------------- atomic shards, incremental


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def test_failure_mid_build_leaves_only_whole_shards_then_incremental_resumes(folder, tmp_path, monkeypatch):
    import clipkit.data.build as b

    opts = {"shard_size": 2, "image": ImageOptions(max_side=64)}
    build(folder, tmp_path / "fresh", **opts)
    real = b.process_item

    def dies_on_item_5(item, o):
        if item.index == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while shard 2 was written
        return real(item, o)

    monkeypatch.setattr(b, "process_item", dies_on_item_5)
    with pytest.raises(KeyboardInterrupt):
        build(folder, tmp_path / "run", **opts)
    monkeypatch.setattr(b, "process_item", real)
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == ["_build.json", "shard-000000.parquet", "shard-000000.tar", "shard-000001.parquet",
                    "shard-000001.tar"]  # fmt: skip
    reports = []
    _, items = open_source(folder)
    stats = build_shards(items, tmp_path / "run", BuildOptions(**opts, incremental=True), source=str(folder),
                         progress=reports.append)  # fmt: skip
    assert [r["reused"] for r in reports] == [True, True, False, False]
    assert _files(tmp_path / "run") == _files(tmp_path / "fresh")
    assert stats["ok"] == 7 and read_sizes(tmp_path / "run") == read_sizes(tmp_path / "fresh")
    with pytest.raises(Exception, match="different settings"):
        build_shards(open_source(folder)[1], tmp_path / "run", BuildOptions(shard_size=3, incremental=True),
                     source=str(folder))  # fmt: skip


def test_sigkill_never_leaves_a_partial_shard_that_looks_whole(tmp_path):
    with FailingServer(slow_s=0.15) as srv:
        for i in range(40):
            srv.images[f"{i}.jpg"] = jpeg((160, 120), seed=i)
        (tmp_path / "urls.txt").write_text(
            "".join(f"{srv.url(f'slow/{i}.jpg')}\tphoto {i}\n" for i in range(40))
        )
        script = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(ROOT)!r})
            from clipkit.cli.main import main
            main(["data", "build", {str(tmp_path / "urls.txt")!r}, "--out", {str(tmp_path / "out")!r},
                  "--shard-size", "4", "--threads", "2", "--max-side", "64"])
        """)  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while not (tmp_path / "out" / "shard-000002.parquet").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for tar in (tmp_path / "out").glob("shard-*.tar"):
            with open(tar, "rb") as f:
                assert len(list(iter_tar(f))) == 4 * 4  # whole: 4 samples x (jpg, txt, json, idx)
        assert not (tmp_path / "out" / "sizes.json").exists()  # the run is visibly incomplete
        code = cli(["data", "build", str(tmp_path / "urls.txt"), "--out", str(tmp_path / "out"), "--shard-size", "4",
                    "--threads", "2", "--max-side", "64", "--incremental"])  # fmt: skip
    assert code == 0
    assert sum(read_sizes(tmp_path / "out").values()) == 40
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_png_source_bytes_are_validated_and_bombs_refused(tmp_path):
    from clipkit.data.decode import SampleError
    from clipkit.data.imageops import process_image

    out = process_image(noise_png((50, 40)), ImageOptions(max_side=20, image_format="png"))
    assert (out.width, out.height, out.original_width) == (20, 16, 50)
    with pytest.raises(SampleError) as err:
        process_image(noise_png((50, 40)), ImageOptions(max_pixels=1000))
    assert err.value.kind == "image_too_large"
    assert photo().size == (320, 240)


# ---------------------------------------------------------------------------- one writer per folder


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s write lock until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from clipkit.data.atomic import folder_lock
        with folder_lock({str(folder)!r}, "holder"):
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_waiter_names_a_holder_that_writes_its_pid_just_after_taking_the_lock(tmp_path):
    """The holder writes its pid just after its flock; a waiter that opens the file in between
    reads it again rather than naming nobody (the race seen once in the suite)."""
    import fcntl
    import os
    import threading

    from clipkit.data.atomic import FolderBusyError, file_lock

    path = tmp_path / "x.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_EX)  # taken, pid not written yet
    late = threading.Timer(0.05, lambda: os.pwrite(holder, b"4242\n", 0))
    late.start()
    try:
        busy = pytest.raises(FolderBusyError, match=r"another clipkit process \(pid 4242\) is testing")
        with busy, file_lock(path, "task", "testing"):
            pass
    finally:
        late.join()
        os.close(holder)


def test_a_build_into_a_folder_another_build_writes_stops_and_names_it(folder, tmp_path, capsys):
    from clipkit.data.atomic import WRITE_LOCK, FolderBusyError

    out = tmp_path / "out"
    opts = {"shard_size": 3, "image": ImageOptions(max_side=64)}
    build(folder, out, **opts)
    before = _files(out)
    holder = _hold_lock(out)
    try:
        with pytest.raises(
            FolderBusyError, match=rf"another clipkit process \(pid {holder.pid}\) is writing {out}"
        ):
            build(folder, out, **opts)
        assert _files(out) == before  # the refused build cleared nothing
        assert cli(["data", "build", str(folder), "--out", str(out), "--shard-size", "3"]) == 2
        assert f"is writing {out}" in capsys.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (out / WRITE_LOCK).exists()  # released: removed by its holder
    assert build(folder, out, **opts)["ok"] == 7 and _files(out) == before
    assert not (out / WRITE_LOCK).exists()


def test_a_killed_holder_leaves_no_lock_behind(folder, tmp_path):
    from clipkit.data.atomic import WRITE_LOCK

    out = tmp_path / "out"
    holder = _hold_lock(out)
    holder.kill()
    holder.wait(timeout=30)
    assert (out / WRITE_LOCK).exists()  # its file stays, its lock does not
    assert build(folder, out, shard_size=3, image=ImageOptions(max_side=64))["ok"] == 7
    assert not (out / WRITE_LOCK).exists()


def test_two_bundled_builds_of_one_folder_run_one_after_the_other(tmp_path, monkeypatch, capsys):
    """``make demo`` beside ``make test``: both build data/<source> when it is missing. The second
    waits for the first and keeps its build, instead of clearing the files it is writing."""
    import threading

    from clipkit.data.builders import BUILDERS, run_builder

    spans, lock = [], threading.Lock()

    def fake(out_dir):
        done = Path(out_dir) / "complete"
        start = time.monotonic()
        if not done.exists():
            time.sleep(0.5)
            done.write_text("built")
        with lock:
            spans.append((start, time.monotonic()))
        return {"ok": 1}

    monkeypatch.setitem(BUILDERS._items, "fake-source", fake)
    out = tmp_path / "fake"
    threads = [threading.Thread(target=run_builder, args=("fake-source", out)) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=30)
    (_s0, e0), (s1, e1) = sorted(spans)
    assert e0 <= s1, f"the two builds overlapped: {spans}"
    assert e1 - s1 < 0.3  # the second found the first's complete build and kept it
    assert f"is writing {out}; waiting for it to end" in capsys.readouterr().err
