"""What the dataset builders of ``data_tools`` share: a stable key hash, the record of a finished
build (``build_info.json``) and balanced PNG shards.

A build first deletes ``build_info.json``, writes its shards and files, and writes the record
last: a folder whose record is there and agrees with its shards is complete, and a rerun with
the same parameters keeps it (``completed_build``); an interrupted build is redone.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from clipkit.data.atomic import atomic_write_text
from clipkit.data.shards import ShardWriter, read_sizes

BUILD_INFO = "build_info.json"


def key_hash(key: str) -> float:
    """Deterministic value in [0, 1) from a key (the same on every machine and Python run)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / 16**12


def completed_build(out: Path, params: dict[str, Any], splits: Iterable[str]) -> dict[str, Any] | None:
    """The counts of ``out``'s build when it is complete and made with ``params``, else None:
    its record says so, ``dataset_type.txt`` is there, and every split's shards are there with the
    recorded number of samples (``sizes.json``)."""
    try:
        info = json.loads((out / BUILD_INFO).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if info.get("params") != params or not (out / "dataset_type.txt").is_file():
        return None
    for split in splits:
        sizes = read_sizes(out / split)
        if sum(sizes.values()) != info["counts"].get(split) or not all(
            (out / split / n).is_file() for n in sizes
        ):
            return None
    return info["counts"]


def start_build(out: Path) -> None:
    """Mark ``out`` incomplete until ``finish_build`` (a build interrupted in between is redone)."""
    (out / BUILD_INFO).unlink(missing_ok=True)


def finish_build(out: Path, params: dict[str, Any], counts: dict[str, Any]) -> None:
    """Record ``out``'s build as complete, last, atomically."""
    atomic_write_text(out / BUILD_INFO, json.dumps({"params": params, "counts": counts}, indent=1))


def write_split(
    out: Path, rows: list[tuple[str, Any, str]], shard_size: int, image_bytes: Callable[[str, Any], bytes]
) -> int:
    """Write (key, source, caption) rows as balanced shards ``out/shard-*.tar``, each image's PNG
    from ``image_bytes(key, source)``; returns the number of shards."""
    # Balanced shards: e.g. 3,558 samples at <= 500 per shard -> 8 shards of ~445.
    n_shards = max(1, math.ceil(len(rows) / shard_size))
    with ShardWriter(out, prefix="shard", maxcount=math.ceil(len(rows) / n_shards)) as writer:
        for key, source, caption in rows:
            writer.write({"__key__": key, "png": image_bytes(key, source), "txt": caption})
    return len(writer.sizes)
