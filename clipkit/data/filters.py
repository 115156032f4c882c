"""``clipkit data filter``: existing shards -> new shards without duplicates, bad captions or poor pairs.

Filters, applied in this order (the first that fails names the sample's status):

* caption decoding and ``CaptionRules`` (length limits, blocklist);
* exact duplicates: the SHA-1 of the decoded pixels; the first occurrence (shard order) stays;
* DataComp-style image-text similarity: ``FilterOptions.scorer`` maps B (PIL image, caption)
  pairs to (B,) similarities (the CLI passes the models layer's ``SimilarityScorer``, the
  cosine similarity under a model); keep pairs scoring ``>= min_similarity``, or the
  ``top_fraction`` best-scoring ones (ties by shard order).

Two passes over the input: the first decides every sample's status (and score), the second
copies the kept samples' members unchanged into ``ShardWriter`` shards (new contiguous
``idx``, same keys). The output folder also gets ``_filter_status.parquet`` (one row per input
sample: key, shard, status, error, score, new idx) and ``_stats.json`` (counts by status).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.data.atomic import atomic_write_bytes, atomic_write_text
from clipkit.data.captions import CaptionRules
from clipkit.data.decode import SampleError, decode_caption, decode_image
from clipkit.data.shards import ShardWriter
from clipkit.data.urls import expand_urls
from clipkit.data.validate import IMAGE_EXTS, ShardScan, image_of, iter_shard

STATUS_FILE, STATS_FILE = "_filter_status.parquet", "_stats.json"


def pixel_hash(img: Any) -> str:
    """SHA-1 of an image's mode, size and pixels: equal for exact duplicates, whatever the encoding."""
    digest = hashlib.sha1(f"{img.mode}{img.size}".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


@dataclass
class FilterOptions:
    rules: CaptionRules = field(default_factory=CaptionRules)
    dedup: bool = False
    # (B PIL images, B captions) -> (B,) similarities; any callable (duck-typed)
    scorer: Callable[[list[Any], list[str]], np.ndarray] | None = None
    min_similarity: float | None = None
    top_fraction: float | None = None
    caption_key: str = "txt"
    batch_size: int = 64

    def __post_init__(self) -> None:
        similarity = self.min_similarity is not None or self.top_fraction is not None
        if similarity and self.scorer is None:
            raise ValueError("similarity filtering needs a model (scorer)")
        if self.min_similarity is not None and self.top_fraction is not None:
            raise ValueError("give min_similarity or top_fraction, not both")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")


@dataclass
class _Row:
    key: str
    shard: str
    status: str = "ok"
    error: str = ""
    score: float | None = None
    idx: int | None = None


def _judge(urls: list[str], opts: FilterOptions) -> list[_Row]:
    """Pass 1: every input sample's status (and similarity score)."""
    rows: list[_Row] = []
    seen: dict[str, str] = {}
    pending: list[tuple[_Row, Any, str]] = []  # waiting for a scoring batch

    def score_pending() -> None:
        if pending and opts.scorer is not None:
            scores = opts.scorer([p[1] for p in pending], [p[2] for p in pending])
            for (row, _, _), s in zip(pending, scores):
                row.score = float(s)
        pending.clear()

    want = {opts.caption_key, *IMAGE_EXTS}.__contains__
    for url in urls:
        scan = ShardScan(url)
        for sample in iter_shard(url, scan, want):
            row = _Row(sample["__key__"], url)
            rows.append(row)
            try:
                caption = decode_caption(sample.get(opts.caption_key))
                opts.rules.check(caption)
                img = decode_image(image_of(sample)[1])
            except SampleError as e:
                row.status, row.error = e.kind, e.detail
                continue
            if opts.dedup:
                first = seen.setdefault(pixel_hash(img), row.key)
                if first != row.key:
                    row.status, row.error = "duplicate", f"same image as {first}"
                    continue
            if opts.scorer is not None:
                pending.append((row, img, caption))
                if len(pending) >= opts.batch_size:
                    score_pending()
        for problem in scan.problems:  # a damaged shard: what was lost is unknown, say so once
            rows.append(_Row(problem.member or "?", url, problem.kind, problem.detail))
    score_pending()
    _apply_similarity(rows, opts)
    return rows


def _apply_similarity(rows: list[_Row], opts: FilterOptions) -> None:
    scored = [r for r in rows if r.status == "ok" and r.score is not None]
    if opts.min_similarity is not None:
        for r in scored:
            if r.score < opts.min_similarity:  # type: ignore[operator]
                r.status, r.error = "low_similarity", f"{r.score:.4f} < {opts.min_similarity}"
    elif opts.top_fraction is not None and scored:
        keep = math.ceil(opts.top_fraction * len(scored))
        ranked = sorted(range(len(scored)), key=lambda i: -scored[i].score)  # stable: ties by order
        cutoff = scored[ranked[keep - 1]].score
        for i in ranked[keep:]:
            r = scored[i]
            r.status, r.error = (
                "low_similarity",
                f"{r.score:.4f} below the top {opts.top_fraction:g} (>= {cutoff:.4f})",
            )


def _write_status(out: Path, rows: list[_Row]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(
        [r.__dict__ for r in rows],
        schema=pa.schema([("key", pa.string()), ("shard", pa.string()), ("status", pa.string()),
                          ("error", pa.string()), ("score", pa.float64()), ("idx", pa.int64())]),
    )  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(out / STATUS_FILE, buf.getvalue())


def filter_shards(
    spec: str, out_dir: str | Path, opts: FilterOptions, *, shard_size: int = 1000, prefix: str = "shard"
) -> dict[str, Any]:
    """Filter the shards of ``spec`` into ``out_dir`` (see module docstring); returns the stats."""
    urls = expand_urls(spec)
    out = Path(out_dir)
    if any(Path(u).resolve().parent == out.resolve() for u in urls):
        raise ValueError(f"--out '{out}' is the input folder; write the filtered shards elsewhere")
    rows = _judge(urls, opts)
    status = {(r.shard, r.key): r for r in rows}
    with ShardWriter(out, prefix=prefix, maxcount=shard_size) as writer:
        for url in urls:  # pass 2: copy the kept samples' members as they are
            for sample in iter_shard(url, ShardScan(url)):
                row = status.get((url, sample["__key__"]))
                if row is not None and row.status == "ok":
                    members = {k: v for k, v in sample.items() if k != "idx"}
                    row.idx = writer.write(members)
    _write_status(out, rows)
    counts = Counter(r.status for r in rows)
    stats = {
        "source": spec, "samples_in": len(rows), "kept": counts.pop("ok", 0), "removed": dict(counts.most_common()),
        "shards": len(writer.sizes), "rules": opts.rules.to_dict(), "dedup": opts.dedup,
        "min_similarity": opts.min_similarity, "top_fraction": opts.top_fraction,
    }  # fmt: skip
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=1))
    return stats
