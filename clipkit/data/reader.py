"""Reading one loader worker's shards: raw samples in order, from a cursor on.

``ShardReader`` yields ``{"__key__", ext: bytes, ..., "__url__", "__pos__": (shard, number)}``
for the members ``want`` accepts, keeping ``cursor`` (``clipkit.data.resume.Cursor``) at the
position after the last sample read, so that a pass can continue there: shards before the
cursor are not opened, samples before it in its shard are skipped by seeking over their tar
members. A shard that breaks off is counted (or raised) by the worker's ``SkipCounter``.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from clipkit.data.decode import SampleError
from clipkit.data.resume import Cursor
from clipkit.data.skips import SkipCounter
from clipkit.data.tario import DuplicateMember, TarDamaged, iter_numbered_samples
from clipkit.data.urls import is_local

SHARD_ERRORS = (TarDamaged, OSError, EOFError, zlib.error)  # a shard that breaks off mid-read


class ShardReader:
    """Raw samples of ``shards`` (one worker's list) from ``cursor`` on.

    ``opener(url)``: a readable byte stream (``clipkit.data.urls.open_url``); ``progress``:
    shared ints the stall watchdog reads (shard index at ``2 w``, samples read at ``2 w + 1``).
    """

    def __init__(
        self,
        shards: list[str],
        want: Callable[[str], bool],
        skips: SkipCounter,
        cursor: Cursor,
        *,
        opener: Callable[[str], Any],
        progress: Any = None,
    ):
        self.shards, self.want, self.skips, self.cursor = shards, want, skips, cursor
        self.opener, self.progress = opener, progress

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cursor = self.cursor
        first, skip = cursor.shard, cursor.offset
        for i in range(first, len(self.shards)):
            cursor.shard, cursor.offset = i, skip if i == first else 0
            if self.progress is not None:
                self.progress[2 * cursor.worker] = i
            yield from self.read_shard(self.shards[i])
        cursor.shard, cursor.offset = len(self.shards), 0
        if self.progress is not None:  # read all its shards (the stream then opens the next pass)
            self.progress[2 * cursor.worker] = len(self.shards)

    def read_shard(self, url: str) -> Iterator[dict[str, Any]]:
        """Samples of shard ``cursor.shard`` from number ``cursor.offset`` on (earlier ones unread)."""
        cursor = self.cursor
        n = skip = cursor.offset
        try:
            with contextlib.closing(self.opener(url)) as stream:
                for number, sample in iter_numbered_samples(stream, self.want, skip.__le__ if skip else None):
                    n = cursor.offset = number + 1
                    if self.progress is not None:
                        self.progress[2 * cursor.worker + 1] = n
                    if isinstance(sample, DuplicateMember):
                        self.skips.bad_sample(url, "?", SampleError("duplicate_member", str(sample)))
                        continue
                    sample["__url__"] = url  # type: ignore[assignment]
                    sample["__pos__"] = (cursor.shard, number)  # type: ignore[assignment]
                    yield sample
                if not is_local(url):
                    # Drain the tar's trailing padding so a pipe's writer exits cleanly
                    # instead of dying of SIGPIPE (which gopen would report as an error).
                    while stream.read(1 << 16):
                        pass
        except SHARD_ERRORS as e:
            self.skips.bad_shard(url, n, e)

    def fetch(self, shard: int, numbers: set[int]) -> dict[int, dict[str, Any]]:
        """Samples ``numbers`` of ``shards[shard]`` (those still readable): a resumed buffer's."""
        url, found = self.shards[shard], {}
        try:
            with contextlib.closing(self.opener(url)) as stream:
                for number, sample in iter_numbered_samples(stream, self.want, numbers.__contains__):
                    if isinstance(sample, dict):
                        sample["__url__"], sample["__pos__"] = url, (shard, number)  # type: ignore[assignment]
                        found[number] = sample
        except SHARD_ERRORS:
            pass  # what could be read is in found; resume.restore reports a missing sample
        return found
