"""Bad data in the loader: raise (``on_error="raise"``) or skip, count and report (``"skip"``).

A ``SkipCounter`` belongs to one loader worker. It counts the samples the worker dropped,
by kind (``SampleError.kind``, or ``corrupt_shard`` / ``unreadable_shard`` for what a
damaged shard lost), until the worker's next batch takes the counts along as ``"skipped"``.
"""

from __future__ import annotations

from collections import Counter

from clipkit.data.decode import SampleError
from clipkit.errors import ClipkitError


class DataError(ClipkitError, ValueError):
    """Bad data with ``on_error="raise"``, or shards that cannot serve the requested setup."""


class SkipCounter:
    """Skips of one worker since its previous batch; ``take()`` hands them over and starts again.

    ``sizes``: samples per shard (from ``sizes.json``, possibly empty): a shard damaged after
    ``n`` of its ``N`` samples then counts ``N - n`` lost samples, else one event.
    """

    def __init__(self, on_error: str, sizes: dict[str, int] | None = None):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {on_error!r}")
        self.on_error, self.sizes = on_error, sizes or {}
        self.counts: Counter[str] = Counter()

    def bad_sample(self, url: str, key: str, err: SampleError) -> None:
        if self.on_error == "raise":
            raise DataError(
                f"bad sample '{key}' in shard '{url}': {err} "
                "(set data.on_error=skip to skip, count and report such samples)"
            ) from err
        self.counts[err.kind] += 1

    def bad_shard(self, url: str, n_read: int, err: Exception) -> None:
        """Shard ``url`` broke off (``err``) after ``n_read`` samples."""
        kind = "unreadable_shard" if isinstance(err, OSError) else "corrupt_shard"
        expected = self.sizes.get(url)
        if self.on_error == "raise":
            raise DataError(
                f"shard '{url}' is damaged after {n_read} samples"
                f"{f' of {expected}' if expected else ''}: {err} "
                "(rebuild the shard, or set data.on_error=skip to use what is readable)"
            ) from err
        self.counts[kind] += max(1, expected - n_read) if expected else 1

    def take(self) -> dict[str, int]:
        """The counts since the previous ``take`` (a plain dict, ``{}`` when none); resets them."""
        out = dict(self.counts)
        self.counts.clear()
        return out

    def __bool__(self) -> bool:
        return bool(self.counts)
