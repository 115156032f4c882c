"""``clipkit data build``: image-caption sources -> webdataset shards, with every dropped item explained.

Output folder:

    shard-000000.tar        samples <key>.jpg|webp|png, <key>.txt, <key>.json (metadata), <key>.idx
    shard-000000.parquet    one row per *source item* of that shard: key, source, status, error, ...
    sizes.json              {shard file: sample count}, for the loader's dataset length
    _stats.json             item counts by status over the whole source ("ok", "http_404", ...)
    _build.json             the options of the run (``--incremental`` refuses to mix options)

Shard ``s`` holds the source items ``[s * shard_size, (s + 1) * shard_size)``. An item's key
is its source position, ``f"{index:09d}"`` (``_<n>`` appended per caption in ``each`` mode),
so keys are stable across runs; ``idx`` counts written samples contiguously from 0 in shard
order. Items are fetched and processed concurrently in a thread pool (one shard ahead) and
written in source order. Each shard is written under a temporary name and renamed when whole
(``TarShard``), then its parquet; a shard counts as finished when both exist, so a killed run
leaves no partial shard that looks whole, and ``incremental=True`` resumes after the last
finished shard. ``sizes.json`` and ``_stats.json`` are written, from the parquets, only when
the run completes.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipkit.data.atomic import atomic_write_bytes, atomic_write_text, folder_lock
from clipkit.data.captions import CaptionRules, usable_captions
from clipkit.data.decode import SampleError
from clipkit.data.download import Fetcher, FetchError
from clipkit.data.imageops import ImageOptions, ProcessedImage, process_image
from clipkit.data.shards import SIZES_FILE, TarShard, read_sizes, shard_name
from clipkit.data.sources import SourceItem
from clipkit.errors import ClipkitError

STATS_FILE, BUILD_FILE = "_stats.json", "_build.json"
CAPTION_MODES = ("first", "each", "lines")


@dataclass(frozen=True)
class BuildOptions:
    shard_size: int = 1000  # source items per shard
    prefix: str = "shard"
    image: ImageOptions = field(default_factory=ImageOptions)
    # first: txt = the first caption | each: one sample per caption | lines: all, one per line
    captions: str = "first"
    require_caption: bool = True  # False: items without any caption are written without txt
    rules: CaptionRules = field(default_factory=CaptionRules)
    dedup: bool = False  # drop later items whose final pixels equal an earlier item's
    threads: int = 16  # concurrent fetch + process
    fetch: Fetcher = field(default_factory=Fetcher)
    incremental: bool = False  # keep finished shards of an interrupted run with the same options
    # Put before every sample key: two builds mixed in one training run need disjoint keys
    # (the feature cache and the resume state are keyed by them), e.g. "s" -> "s000000012".
    key_prefix: str = ""

    def __post_init__(self) -> None:
        if self.captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {', '.join(CAPTION_MODES)}, got {self.captions!r}")
        if self.shard_size < 1 or self.threads < 1:
            raise ValueError("shard_size and threads must be >= 1")

    def identity(self) -> dict[str, Any]:
        """What must match for ``incremental`` to reuse shards (not threads or timeouts)."""
        d = asdict(self)
        for name in ("threads", "fetch", "incremental"):
            d.pop(name)
        d["rules"] = self.rules.to_dict()
        d["image"]["border_color"] = list(self.image.border_color)
        if not self.key_prefix:  # builds from before the option match builds without a prefix
            d.pop("key_prefix")
        return d


@dataclass
class Outcome:
    item: SourceItem
    status: str  # "ok" or an error class
    detail: str = ""
    texts: list[str] = field(default_factory=list)
    image: ProcessedImage | None = None


def sample_key(index: int) -> str:
    return f"{index:09d}"


# ---------------------------------------------------------------------------- one item


def _read(item: SourceItem, fetcher: Fetcher) -> bytes:
    if not item.ref:
        raise SampleError("missing_image", "no image path or URL")
    if item.is_url:
        return fetcher.fetch(item.ref)
    try:
        return Path(item.ref).read_bytes()
    except FileNotFoundError:
        raise SampleError("missing_file", f"no such file: {item.ref}") from None
    except OSError as e:
        raise SampleError("read_error", f"{item.ref}: {e}") from None


def process_item(item: SourceItem, opts: BuildOptions) -> Outcome:
    """Caption, fetch, image: the first failure decides the status (captions first: no download
    is spent on an item that would be dropped anyway)."""
    try:
        try:
            texts = usable_captions(item.captions, opts.rules)
        except SampleError as err:
            if opts.require_caption or err.kind != "missing_caption":
                raise
            texts = []
        image = process_image(_read(item, opts.fetch), opts.image)
    except (SampleError, FetchError) as err:
        return Outcome(item, err.kind, err.detail)
    return Outcome(item, "ok", texts=texts, image=image)


def _samples(out: Outcome, key: str, opts: BuildOptions) -> list[tuple[str, dict[str, Any]]]:
    """The (key, members) written for an ok item: one, or one per caption in ``each`` mode."""
    img = out.image
    assert img is not None
    meta = {
        "key": key, "source": out.item.ref, "captions": out.texts, "width": img.width,
        "height": img.height, "original_width": img.original_width,
        "original_height": img.original_height,
    }  # fmt: skip
    if opts.captions == "each" and len(out.texts) > 1:
        texts = [(f"{key}_{c}", t) for c, t in enumerate(out.texts)]
    elif out.texts:
        joined = "\n".join(out.texts) if opts.captions == "lines" else out.texts[0]
        texts = [(key, joined)]
    else:
        texts = [(key, None)]
    samples = []
    for k, text in texts:
        members: dict[str, Any] = {img.ext: img.data}
        if text is not None:
            members["txt"] = text
        members["json"] = json.dumps({**meta, "key": k}, ensure_ascii=False)
        samples.append((k, members))
    return samples


# ---------------------------------------------------------------------------- status tables

COLUMNS = {
    "key": "string", "index": "int64", "source": "string", "status": "string", "error": "string",
    "idx": "int64", "samples": "int32", "caption": "string", "captions": "int32", "width": "int32",
    "height": "int32", "original_width": "int32", "original_height": "int32", "sha1": "string",
    "bytes": "int64",
}  # fmt: skip


def _row(out: Outcome, key: str, idx: int | None, samples: int) -> dict[str, Any]:
    img = out.image if out.status == "ok" else None
    return {
        "key": key, "index": out.item.index, "source": out.item.ref, "status": out.status,
        "error": out.detail, "idx": idx, "samples": samples,
        "caption": out.texts[0] if out.texts else None, "captions": len(out.texts),
        "width": img and img.width, "height": img and img.height,
        "original_width": img and img.original_width, "original_height": img and img.original_height,
        "sha1": out.image.sha1 if out.image else None, "bytes": img and len(img.data),
    }  # fmt: skip


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.type_for_alias(t)) for name, t in COLUMNS.items()])
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_status(path: str | Path) -> list[dict[str, Any]]:
    """The rows of one shard's status parquet."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


# ---------------------------------------------------------------------------- the run


def shard_files(out: Path, prefix: str) -> dict[int, dict[str, Path]]:
    """{shard number: {"tar": path, "parquet": path}} of this prefix's finished files."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)\.(tar|parquet)")
    found: dict[int, dict[str, Path]] = {}
    for p in out.iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = p
    return found


def prepare_output(out: Path, opts: BuildOptions, source: str) -> None:
    """Create ``out``; check ``--incremental`` options against ``_build.json`` (or clear this
    prefix's shards for a fresh build); record the options."""
    out.mkdir(parents=True, exist_ok=True)
    info = {"source": source, "options": opts.identity()}
    build_file = out / BUILD_FILE
    if opts.incremental and build_file.is_file():
        old = json.loads(build_file.read_text())
        changed = sorted(k for k in info["options"] if old.get("options", {}).get(k) != info["options"][k])
        if changed or old.get("source") != source:
            what = ", ".join(changed) or f"source ({old.get('source')} -> {source})"
            raise ClipkitError(
                f"--incremental: '{out}' was built with different settings ({what}); "
                "rerun without --incremental to rebuild, or use the same settings"
            )
    else:  # a fresh build (also --incremental without a previous run's record)
        for files in shard_files(out, opts.prefix).values():
            for p in files.values():
                p.unlink()
        for name in (SIZES_FILE, STATS_FILE):
            (out / name).unlink(missing_ok=True)
    remove_temporaries(out, opts.prefix)
    atomic_write_text(build_file, json.dumps(info, indent=1, sort_keys=True))


def remove_temporaries(out: Path, prefix: str) -> None:
    """Delete the temporary files of writers that were killed (``TarShard``, atomic parquet)."""
    for p in out.glob(f".{prefix}-*.tmp"):
        p.unlink(missing_ok=True)


def source_chunks(items: Iterable[SourceItem], size: int) -> Iterator[tuple[int, list[SourceItem]]]:
    """(shard number, its items) in source order: shard ``s`` holds indexes ``[s * size, (s + 1) * size)``."""
    chunk: list[SourceItem] = []
    shard = 0
    for item in items:
        if item.index // size != shard and chunk:
            yield shard, chunk
            chunk = []
        shard = item.index // size
        chunk.append(item)
    if chunk:
        yield shard, chunk


class BuildState:
    """State of one build in shard order: the next idx, dedup hashes, and per-shard writing.
    The local engine writes through ``write``; a distributed one ``place``s each shard from its
    ``ok_summary`` and writes it elsewhere with the returned first idx and hashes."""

    def __init__(self, out: Path, opts: BuildOptions, progress: Callable[[dict], None] | None):
        self.out, self.opts, self.progress = out, opts, progress
        self.next_idx = 0
        self.seen: dict[str, str] = {}  # sha1 -> key of the first item with these pixels
        self.finished = {n for n, f in shard_files(out, opts.prefix).items() if len(f) == 2}
        self.rebuilt_any = False

    def reuse(self, shard: int) -> bool:
        """Account a finished shard of an earlier run; False when it must be rebuilt."""
        if not self.opts.incremental or shard not in self.finished:
            return False
        rows = read_status(self.out / f"{self.opts.prefix}-{shard:06d}.parquet")
        first = min((r["idx"] for r in rows if r["status"] == "ok"), default=self.next_idx)
        if first != self.next_idx:  # an earlier shard was rebuilt with another sample count
            return False
        for r in rows:
            if r["status"] == "ok" and r["sha1"]:
                self.seen.setdefault(r["sha1"], r["key"])
        self.next_idx += sum(r["samples"] for r in rows)
        self._report(shard, rows, reused=True)
        return True

    def write(self, shard: int, outcomes: Iterable[Outcome]) -> None:
        rows = write_shard(self.out, self.opts, shard, outcomes, self.next_idx, self.seen)
        self.next_idx += sum(r["samples"] for r in rows)
        self._report(shard, rows, reused=False)

    def place(self, summary: list[tuple[str, str | None, int]]) -> tuple[int, dict[str, str]]:
        """Account a shard that is written elsewhere from its ``ok_summary``: returns its first idx
        and the ``seen`` entries of its images, with which ``write_shard`` writes what ``write``
        would have written here."""
        first_idx, shard_seen = self.next_idx, {}
        for key, sha1, samples in summary:
            if sha1 is not None:  # the same test as write_shard's
                shard_seen[sha1] = self.seen.setdefault(sha1, key)
                if shard_seen[sha1] != key:
                    continue  # a duplicate: written as a status row without samples
            self.next_idx += samples
        return first_idx, shard_seen

    def _report(self, shard: int, rows: list[dict[str, Any]], reused: bool) -> None:
        if self.progress is not None:
            self.progress(shard_report(self.opts.prefix, shard, rows, reused))


def write_shard(
    out: Path,
    opts: BuildOptions,
    shard: int,
    outcomes: Iterable[Outcome],
    first_idx: int,
    seen: dict[str, str],
) -> list[dict[str, Any]]:
    """Write shard ``shard`` (its tar, then its status parquet, each atomically) from its items'
    outcomes in source order; returns the status rows. Samples get idx ``first_idx, first_idx + 1,
    ...``. ``seen`` maps an image's sha1 to the key of the first ok item with those pixels (dedup;
    this shard's new images are added): every engine writes a shard through this one function."""
    name = shard_name(opts.prefix, shard)
    rows, next_idx = [], first_idx
    with TarShard(out / name) as tar:
        for o in outcomes:
            key = opts.key_prefix + sample_key(o.item.index)
            if o.status == "ok" and opts.dedup and o.image is not None:
                first = seen.setdefault(o.image.sha1, key)
                if first != key:
                    o.status, o.detail = "duplicate", f"same image as {first}"
            if o.status != "ok":
                rows.append(_row(o, key, None, 0))
                continue
            samples = _samples(o, key, opts)
            rows.append(_row(o, key, next_idx, len(samples)))
            for k, members in samples:
                tar.add(k, {**members, "idx": str(next_idx)})
                next_idx += 1
    _write_table(out / name.replace(".tar", ".parquet"), rows)
    return rows


def ok_summary(outcomes: list[Outcome], opts: BuildOptions) -> list[tuple[str, str | None, int]]:
    """(key, image sha1 when deduplicating, samples) of each ok item in order: all that
    ``BuildState.place`` needs to place a shard, without its images."""
    summary = []
    for o in outcomes:
        if o.status == "ok":
            key = opts.key_prefix + sample_key(o.item.index)
            sha1 = o.image.sha1 if opts.dedup and o.image is not None else None
            summary.append((key, sha1, len(_samples(o, key, opts))))
    return summary


def shard_report(prefix: str, shard: int, rows: list[dict[str, Any]], reused: bool) -> dict[str, Any]:
    """The ``progress`` record of one finished shard (``clipkit data build`` prints one line each)."""
    statuses = Counter(r["status"] for r in rows)
    return {
        "shard": shard_name(prefix, shard), "items": len(rows), "ok": statuses.pop("ok", 0),
        "samples": sum(r["samples"] for r in rows), "errors": dict(statuses), "reused": reused,
    }  # fmt: skip


def build_shards(
    items: Iterable[SourceItem],
    out_dir: str | Path,
    opts: BuildOptions,
    *,
    source: str = "",
    progress: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Write the shards of ``items`` into ``out_dir``; returns the ``_stats.json`` content."""
    out = Path(out_dir)
    with folder_lock(out, f"clipkit data build --out {out}"):
        return _build_shards(items, out, opts, source, progress)


def _build_shards(
    items: Iterable[SourceItem],
    out: Path,
    opts: BuildOptions,
    source: str,
    progress: Callable[[dict], None] | None,
) -> dict[str, Any]:
    start = time.time()
    prepare_output(out, opts, source)
    run = BuildState(out, opts, progress)
    last = -1
    with ThreadPoolExecutor(opts.threads, thread_name_prefix="clipkit-build") as pool:
        chunks = source_chunks(items, opts.shard_size)
        ahead: deque[tuple[int, list[SourceItem], list[Future] | None]] = deque()

        def submit_next() -> None:
            nxt = next(chunks, None)
            if nxt is not None:
                shard, chunk = nxt
                reusable = opts.incremental and shard in run.finished
                futures = None if reusable else [pool.submit(process_item, it, opts) for it in chunk]
                ahead.append((shard, chunk, futures))

        try:
            submit_next()
            while ahead:
                submit_next()  # one shard ahead: downloads continue while this one is written
                shard, chunk, futures = ahead.popleft()
                last = shard
                if futures is None and run.reuse(shard):
                    continue
                futures = futures or [pool.submit(process_item, it, opts) for it in chunk]
                run.write(shard, (f.result() for f in futures))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return finish_build(out, opts, last, source, time.time() - start)


def finish_build(out: Path, opts: BuildOptions, last: int, source: str, elapsed: float) -> dict[str, Any]:
    """Drop shards beyond the source's end, then write sizes.json and _stats.json from the parquets."""
    files = shard_files(out, opts.prefix)
    for n in [n for n in files if n > last]:  # left by an earlier run over a longer source
        for p in files.pop(n).values():
            p.unlink()
    sizes, statuses, samples = {}, Counter(), 0
    for n in sorted(files):
        rows = read_status(files[n]["parquet"])
        sizes[shard_name(opts.prefix, n)] = sum(r["samples"] for r in rows)
        statuses.update(r["status"] for r in rows)
        samples += sizes[shard_name(opts.prefix, n)]
    kept = {k: v for k, v in read_sizes(out).items() if not k.startswith(f"{opts.prefix}-")}
    atomic_write_text(out / SIZES_FILE, json.dumps({**kept, **sizes}, indent=1, sort_keys=True))
    ok = statuses.pop("ok", 0)
    stats = {
        "source": source, "items": ok + sum(statuses.values()), "ok": ok, "samples": samples,
        "shards": len(sizes), "errors": dict(statuses.most_common()), "elapsed_s": round(elapsed, 3),
        "options": opts.identity(),
    }  # fmt: skip
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=1))
    return stats
