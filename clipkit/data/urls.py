"""Shard specs -> shard lists, shard streams, and dataset sizes.

A spec is one string: ``"::"``-joined parts, each a brace pattern
(``data/emoji/train-{000000..000007}.tar``), a local file, a directory (all its ``*.tar``),
or a ``pipe:`` command / URL read through webdataset's ``gopen``. A local part that matches
no file is an error naming the part, never a silently empty epoch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import braceexpand

from clipkit.data.shards import read_sizes
from clipkit.errors import ClipkitError


class ShardSpecError(ClipkitError, ValueError):
    """A shard spec that names no usable shards."""


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    return os.path.expanduser(url.removeprefix("file:"))


def _expand_part(part: str) -> list[str]:
    if not is_local(part):
        return list(braceexpand.braceexpand(part))
    path = _local_path(part)
    if Path(path).is_dir():
        shards = sorted(str(p) for p in Path(path).glob("*.tar"))
        if not shards:
            raise ShardSpecError(f"shard directory '{part}' holds no *.tar files")
        return shards
    names = list(braceexpand.braceexpand(path))
    missing = [n for n in names if not Path(n).is_file()]
    if len(missing) == len(names):
        raise ShardSpecError(
            f"shard pattern '{part}' matches no existing file "
            f"(first expansion: '{names[0]}'); check the path and the brace range"
        )
    if missing:
        raise ShardSpecError(
            f"shard pattern '{part}': {len(missing)} of {len(names)} shards do not exist, "
            f"e.g. '{missing[0]}'; fix the brace range or rebuild the shards"
        )
    return names


def expand_urls(spec: str) -> list[str]:
    """Expand a shard spec into the ordered list of shard URLs / paths (see module doc)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ShardSpecError("no shards given: the shard spec is empty (set data.train / data.val)")
    urls: list[str] = []
    for part in spec.split("::"):
        if part.strip():
            urls.extend(_expand_part(part.strip()))
    return urls


def open_url(url: str) -> IO[bytes]:
    """A readable binary stream for a local path or any URL webdataset's ``gopen`` knows."""
    if is_local(url):
        return open(_local_path(url), "rb", buffering=1 << 20)
    from webdataset.gopen import gopen  # pipe:, http(s):// via curl, ...

    return gopen(url, "rb")


def shard_sizes(urls: list[str]) -> dict[str, int]:
    """{url: sample count} for the local shards listed in their directory's ``sizes.json``."""
    out: dict[str, int] = {}
    by_dir: dict[str, dict[str, int]] = {}
    for url in urls:
        if not is_local(url):
            continue
        path = Path(_local_path(url))
        sizes = by_dir.setdefault(str(path.parent), read_sizes(path.parent))
        if path.name in sizes:
            out[url] = sizes[path.name]
    return out


def dataset_size(spec: str | list[str]) -> int | None:
    """Number of samples in the shards of ``spec`` from ``sizes.json``; None if any is unlisted."""
    urls = expand_urls(spec) if isinstance(spec, str) else list(spec)
    sizes = shard_sizes(urls)
    return sum(sizes.values()) if urls and len(sizes) == len(urls) else None
