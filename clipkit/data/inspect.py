"""``clipkit data inspect``: what is in a set of shards, in numbers and in pictures.

Reports sample counts (per shard, and against ``sizes.json``), histograms of caption length
(words) and image size (longest side, from the image header), duplicate keys, broken samples
(every image is decoded; JPEGs at a reduced DCT scale, which still reads all of their data,
so truncation is caught) and, when the folder has one, the build's ``_stats.json``. Writes a
PNG grid of N random samples with their captions (``preview``), so a user can *see* the data.
"""

from __future__ import annotations

import itertools
import random
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.data.atomic import atomic_open
from clipkit.data.decode import SampleError, decode_caption, decode_image, open_image
from clipkit.data.shards import read_sizes
from clipkit.data.urls import expand_urls, is_local
from clipkit.data.validate import IMAGE_EXTS, Problem, ShardScan, image_of, iter_shard

CAPTION_BINS = [0, 1, 2, 4, 8, 16, 32, 64, 128]  # words; the last bin is open-ended
SIZE_BINS = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096]  # pixels, longest side


def _histogram(values: list[int], edges: list[int]) -> list[tuple[str, int]]:
    counts = np.histogram(values, bins=[*edges, np.inf])[0] if values else np.zeros(len(edges), int)
    labels = [f"{a}-{b - 1}" for a, b in itertools.pairwise(edges)] + [f">={edges[-1]}"]
    return [(label, int(n)) for label, n in zip(labels, counts)]


@dataclass
class Inspection:
    shards: dict[str, int] = field(default_factory=dict)  # url -> samples read
    listed: dict[str, int] = field(default_factory=dict)  # url -> sizes.json count
    caption_words: list[int] = field(default_factory=list)
    caption_chars: list[int] = field(default_factory=list)
    longest_side: list[int] = field(default_factory=list)
    formats: Counter[str] = field(default_factory=Counter)
    duplicate_keys: list[tuple[str, str, str]] = field(default_factory=list)  # key, first, again
    broken: list[Problem] = field(default_factory=list)
    build_stats: dict[str, Any] | None = None
    preview: list[tuple[bytes, str, str]] = field(default_factory=list)  # image, caption, key

    @property
    def samples(self) -> int:
        return sum(self.shards.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": len(self.shards), "samples": self.samples, "per_shard": self.shards,
            "sizes_json": self.listed or None,
            "caption_words": _histogram(self.caption_words, CAPTION_BINS),
            "caption_chars": _summary(self.caption_chars),
            "image_longest_side": _histogram(self.longest_side, SIZE_BINS),
            "image_formats": dict(self.formats),
            "duplicate_keys": [{"key": k, "first": a, "again": b} for k, a, b in self.duplicate_keys],
            "broken": {"count": len(self.broken), "by_kind": dict(Counter(p.kind for p in self.broken)),
                       "samples": [str(p) for p in self.broken]},
            "build_stats": self.build_stats,
        }  # fmt: skip


def _summary(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values)
    return {"min": int(a.min()), "median": float(np.median(a)), "mean": float(a.mean()), "max": int(a.max())}


def _look_at(
    sample: dict[str, bytes], url: str, caption_key: str, found: Inspection
) -> tuple[bytes, str] | None:
    """Record one sample's numbers; (image, caption) when it is usable, else None."""
    key = sample["__key__"]
    bad = False
    try:
        caption = decode_caption(sample.get(caption_key))
        found.caption_words.append(len(caption.split()))
        found.caption_chars.append(len(caption))
    except SampleError as e:
        found.broken.append(Problem(url, f"{key}.{caption_key}", e.kind, e.detail))
        caption, bad = "", True
    ext, data = image_of(sample)
    try:
        header = open_image(data)
        found.longest_side.append(max(header.size))
        found.formats[str(header.format)] += 1
        decode_image(data, draft_size=32)  # reads (and checks) all of the image data
    except SampleError as e:
        found.broken.append(Problem(url, f"{key}.{ext or 'jpg'}", e.kind, e.detail))
        bad = True
    return None if bad or data is None else (data, caption)


def inspect_shards(
    spec: str, *, preview: int = 16, seed: int = 0, caption_key: str = "txt", limit: int | None = None
) -> Inspection:
    """Scan the shards of ``spec`` (all samples, or the first ``limit``) into an ``Inspection``."""
    urls = expand_urls(spec)
    found = Inspection()
    rng = random.Random(seed)
    seen_keys: dict[str, str] = {}
    usable = 0
    want = {caption_key, *IMAGE_EXTS}.__contains__
    for url in urls:
        scan = ShardScan(url)
        for sample in iter_shard(url, scan, want):
            key = sample["__key__"]
            if key in seen_keys:
                found.duplicate_keys.append((key, seen_keys[key], url))
            seen_keys.setdefault(key, url)
            pair = _look_at(sample, url, caption_key, found)
            if pair is not None:  # reservoir sampling of the preview
                usable += 1
                if len(found.preview) < preview:
                    found.preview.append((*pair, key))
                elif (j := rng.randrange(usable)) < preview:
                    found.preview[j] = (*pair, key)
            if limit is not None and sum(found.shards.values()) + scan.samples >= limit:
                break
        found.shards[url] = scan.samples
        found.broken.extend(scan.problems)
        if limit is not None and found.samples >= limit:
            break
    _read_folder_files(urls, found)
    return found


def _read_folder_files(urls: list[str], found: Inspection) -> None:
    import json

    folders = sorted({Path(u).parent for u in urls if is_local(u)})
    for folder in folders:
        sizes = read_sizes(folder)
        found.listed.update({str(folder / n): c for n, c in sizes.items() if str(folder / n) in found.shards})
    if len(folders) == 1 and (folders[0] / "_stats.json").is_file():
        found.build_stats = json.loads((folders[0] / "_stats.json").read_text())


def write_preview(found: Inspection, path: str | Path, columns: int = 4) -> Path:
    """A PNG grid of the preview samples, each with its key and (wrapped) caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(found.preview)
    if n == 0:
        raise ValueError("no usable sample to preview")
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (data, caption, key) in zip(axes.flat, found.preview):
        img = decode_image(data, draft_size=256)
        img.thumbnail((256, 256))
        ax.imshow(np.asarray(img))
        text = "\n".join(textwrap.wrap(caption, 34, max_lines=3, placeholder=" ..."))
        ax.set_title(f"{key}\n{text}", fontsize=8, loc="left")
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return path


def format_report(found: Inspection, max_lines: int = 20) -> str:
    """The human-readable report printed by ``clipkit data inspect``."""
    d = found.to_dict()
    lines = [f"{d['shards']} shards, {d['samples']} samples"]
    mismatched = {
        u: (c, found.listed[u]) for u, c in found.shards.items() if u in found.listed and found.listed[u] != c
    }
    for url, (got, listed) in mismatched.items():
        lines.append(f"  {url}: read {got} samples, sizes.json says {listed}")
    if found.build_stats:
        s = found.build_stats
        errors = ", ".join(f"{k} {v}" for k, v in s.get("errors", {}).items()) or "none"
        lines.append(f"build: {s.get('items')} source items, {s.get('ok')} ok; dropped: {errors}")
    for title, hist in (
        ("caption length (words)", d["caption_words"]),
        ("image longest side (px)", d["image_longest_side"]),
    ):
        lines.append(f"{title}:")
        top = max((n for _, n in hist), default=0) or 1
        lines += [f"  {label:>10} {n:8d} {'#' * round(30 * n / top)}" for label, n in hist if n]
    if d["caption_chars"]:
        c = d["caption_chars"]
        lines.append(f"caption chars: min {c['min']}, median {c['median']:.0f}, max {c['max']}")
    lines.append(f"image formats: {', '.join(f'{k} {v}' for k, v in found.formats.most_common()) or '-'}")
    lines.append(f"duplicate keys: {len(found.duplicate_keys)}")
    lines += [f"  {k}: in {a} and {b}" for k, a, b in found.duplicate_keys[:max_lines]]
    lines.append(
        f"broken samples: {len(found.broken)}" + (f" ({d['broken']['by_kind']})" if found.broken else "")
    )
    lines += [f"  {p}" for p in found.broken[:max_lines]]
    if len(found.broken) > max_lines:
        lines.append(f"  ... {len(found.broken) - max_lines} more (clipkit data validate lists all)")
    return "\n".join(lines)
