"""``clipkit data validate``: a full scan of every shard, naming each corrupt shard and member.

Checks, each reported as ``Problem(shard, member, kind, detail)``:

* the tar itself: truncated, corrupt header, unreadable (``corrupt_shard``, ``unreadable_shard``);
* every sample: an image member that fully decodes (``missing_image``, ``empty_image``,
  ``decode_error``, ``image_too_large``), a UTF-8, non-empty caption (``missing_caption``,
  ``empty_caption``, ``bad_caption_encoding``), an integer ``idx`` if present (``bad_idx``),
  no member twice (``duplicate_member``);
* across shards: keys seen twice (``duplicate_key``);
* ``sizes.json``: counts that differ from the shard (``size_mismatch``) and listed shards that
  are missing (``missing_shard``).

Shards are checked in parallel processes (``workers``); the report lists problems in shard order.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from clipkit.data.decode import SampleError, decode_caption, decode_image, parse_idx
from clipkit.data.shards import read_sizes
from clipkit.data.tario import DuplicateMember, TarDamaged, iter_samples
from clipkit.data.urls import expand_urls, is_local, open_url

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Problem:
    shard: str
    member: str | None  # "<key>.<ext>", or None for the shard as a whole
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.shard}: {self.member}" if self.member else self.shard
        return f"{where}: {self.kind}" + (f": {self.detail}" if self.detail else "")


@dataclass
class ShardScan:
    url: str
    samples: int = 0  # complete samples read (good or bad)
    keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    damaged: bool = False


def iter_shard(url: str, scan: ShardScan, want=None) -> Iterator[dict[str, bytes]]:
    """Samples of one shard; damage and duplicate members become ``scan.problems``."""
    try:
        with contextlib.closing(open_url(url)) as stream:
            for sample in iter_samples(stream, want):
                scan.samples += 1
                if isinstance(sample, DuplicateMember):
                    scan.problems.append(
                        Problem(url, str(sample).split("'")[1], "duplicate_member", str(sample))
                    )
                    continue
                scan.keys.append(sample["__key__"])  # type: ignore[arg-type]
                yield sample  # type: ignore[misc]
    except (TarDamaged, EOFError, zlib.error) as e:
        scan.damaged = True
        scan.problems.append(Problem(url, None, "corrupt_shard", f"after {scan.samples} samples: {e}"))
    except OSError as e:
        scan.damaged = True
        scan.problems.append(Problem(url, None, "unreadable_shard", str(e)))


def image_of(sample: dict[str, bytes], exts: tuple[str, ...] = IMAGE_EXTS) -> tuple[str | None, bytes | None]:
    """(extension, bytes) of the sample's first image member, or (None, None)."""
    for ext in exts:
        if ext in sample:
            return ext, sample[ext]
    return None, None


def check_sample(
    url: str, sample: dict[str, bytes], caption_key: str, exts: tuple[str, ...]
) -> list[Problem]:
    key = sample["__key__"]
    problems = []
    ext, data = image_of(sample, exts)
    try:
        decode_image(data)  # full decode: truncation anywhere in the data fails
    except SampleError as e:
        problems.append(Problem(url, f"{key}.{ext or exts[0]}", e.kind, e.detail))
    for member, check in ((caption_key, decode_caption), ("idx", parse_idx)):
        try:
            if member != "idx" or "idx" in sample:
                check(sample.get(member))
        except SampleError as e:
            problems.append(Problem(url, f"{key}.{member}", e.kind, e.detail))
    return problems


def validate_shard(url: str, caption_key: str = "txt", exts: tuple[str, ...] = IMAGE_EXTS) -> ShardScan:
    scan = ShardScan(url)
    for sample in iter_shard(url, scan):
        scan.problems.extend(check_sample(url, sample, caption_key, exts))
    return scan


def _sizes_problems(urls: list[str], scans: list[ShardScan]) -> list[Problem]:
    problems = []
    counted = {s.url: s for s in scans}
    folders = {Path(u).parent for u in urls if is_local(u)}
    for folder in sorted(folders):
        for name, n in read_sizes(folder).items():
            path = str(folder / name)
            scan = counted.get(path)
            if scan is None:
                if not (folder / name).exists():
                    problems.append(Problem(path, None, "missing_shard", "listed in sizes.json, not on disk"))
            elif not scan.damaged and scan.samples != n:
                problems.append(
                    Problem(path, None, "size_mismatch", f"sizes.json says {n}, shard holds {scan.samples}")
                )
    return problems


@dataclass
class ValidationReport:
    shards: int
    samples: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"ok: {self.shards} shards, {self.samples} samples, no problems"
        bad_shards = len({p.shard for p in self.problems})
        return f"FAILED: {len(self.problems)} problem(s) in {bad_shards} of {self.shards} shards ({self.samples} samples)"


def validate_shards(
    spec: str, caption_key: str = "txt", image_keys: str = "jpg;jpeg;png;webp", workers: int = 1
) -> ValidationReport:
    """Scan every shard of ``spec`` (see ``expand_urls``) fully; see the module docstring."""
    urls = expand_urls(spec)
    exts = tuple(e.strip().lower() for e in image_keys.split(";") if e.strip())
    if workers > 1 and len(urls) > 1:
        with ProcessPoolExecutor(min(workers, len(urls))) as pool:
            scans = list(pool.map(validate_shard, urls, [caption_key] * len(urls), [exts] * len(urls)))
    else:
        scans = [validate_shard(u, caption_key, exts) for u in urls]
    problems = [p for s in scans for p in s.problems]
    seen: dict[str, str] = {}  # key -> shard where it first appeared
    for s in scans:
        for key in s.keys:
            if key in seen:
                problems.append(Problem(s.url, key, "duplicate_key", f"first seen in {seen[key]}"))
            else:
                seen[key] = s.url
    problems.extend(_sizes_problems(urls, scans))
    return ValidationReport(len(urls), sum(s.samples for s in scans), problems)
