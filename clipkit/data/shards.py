"""Write webdataset shards that are either whole or absent.

A shard is a plain tar whose members are ``<key>.<ext>``; consecutive members sharing a key
form one sample. ``ShardWriter`` writes each shard under a hidden temporary name, fsyncs it
and renames it into place, so a killed job never leaves a partial file that looks like a
finished shard. ``sizes.json`` ({shard file name: sample count}, the format open_clip reads)
lists a prefix's shards only once all of them are complete:

    with ShardWriter("data/emoji", prefix="train", maxcount=500) as w:
        w.write({"__key__": "1f600", "png": png_bytes, "txt": "grinning face"})
    # data/emoji/train-000000.tar ..., data/emoji/sizes.json

Every sample gets an ``idx`` member: its contiguous integer position in the writer's output
(0, 1, 2, ... from ``start_idx``), which the loader returns as ``batch["idx"]``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

from clipkit.data.atomic import atomic_open, atomic_write_text

SIZES_FILE = "sizes.json"


def shard_name(prefix: str, index: int, digits: int = 6) -> str:
    """``train-000003.tar``; with an empty prefix and ``digits=0``, ``3.tar`` (CLIP_benchmark)."""
    number = f"{index:0{digits}d}" if digits else str(index)
    return f"{prefix}-{number}.tar" if prefix else f"{number}.tar"


def _name_regex(prefix: str) -> re.Pattern[str]:
    return re.compile((re.escape(prefix) + "-" if prefix else "") + r"\d+\.tar")


def read_sizes(directory: str | Path) -> dict[str, int]:
    """``sizes.json`` of a shard directory, or {} when there is none."""
    path = Path(directory) / SIZES_FILE
    if not path.is_file():
        return {}
    try:
        sizes = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or rebuild the shards") from e
    if not isinstance(sizes, dict):
        raise TypeError(f"{path} must map shard file names to sample counts")
    return {str(k): int(v) for k, v in sizes.items()}


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/"):
        raise ValueError(f"sample '__key__' must be a non-empty relative name, got {key!r}")
    if "." in key.rsplit("/", 1)[-1]:
        # webdataset splits a member name into key and extension at the first dot.
        raise ValueError(f"sample key {key!r} contains '.'; readers would split it there")
    return key


def _member_bytes(key: str, ext: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"sample {key!r} member '{ext}' must be bytes or str, got {type(value).__name__}")


class TarShard:
    """One shard written whole or not at all: a temporary file renamed into place on success.

        with TarShard("out/shard-000003.tar") as t:
            t.add("000003000", {"jpg": jpeg_bytes, "txt": "a cat", "idx": "3000"})

    On an exception inside ``with`` the temporary file is deleted and ``path`` is untouched.
    Members get fixed metadata, so the same samples always give byte-identical shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        self._stack = contextlib.ExitStack()
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> TarShard:  # noqa: PYI034 (py3.10: no typing.Self)
        f = self._stack.enter_context(atomic_open(self.path, "wb"))
        self._tar = self._stack.enter_context(tarfile.TarFile(fileobj=f, mode="w", format=tarfile.PAX_FORMAT))
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._tar = None
        # Closes the tar, then fsyncs and renames (or, on an exception, deletes) the file.
        self._stack.__exit__(exc_type, exc, tb)  # type: ignore[arg-type]

    def add(self, key: str, members: dict[str, Any]) -> None:
        """Append one sample: ``<key>.<ext>`` members in the given order."""
        key = _check_key(key)
        assert self._tar is not None, "use TarShard inside 'with'"
        for ext, value in members.items():
            data = _member_bytes(key, ext, value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1


def write_sizes(directory: str | Path, sizes: dict[str, int]) -> None:
    """Merge ``sizes`` into the directory's ``sizes.json`` (atomically)."""
    merged = {**read_sizes(directory), **sizes}
    atomic_write_text(Path(directory) / SIZES_FILE, json.dumps(merged, indent=1, sort_keys=True))


class ShardWriter:
    """Write samples into ``<out_dir>/<prefix>-NNNNNN.tar`` shards of ``maxcount`` samples.

    Shards of the same name pattern left from an earlier run are deleted when the writer
    starts, and their ``sizes.json`` entries removed, so the directory never mixes two runs.
    On an exception inside ``with``, the shard being written is discarded and ``sizes.json``
    does not list this prefix (the output is visibly incomplete).
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        maxcount: int = 1000,
        *,
        start_idx: int = 0,
        digits: int = 6,
    ):
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.out_dir = Path(out_dir)
        self.prefix, self.maxcount, self.digits = prefix, maxcount, digits
        self.next_idx = start_idx
        self.sizes: dict[str, int] = {}  # finished shards of this writer
        self._keys: set[str] = set()
        self._shard: TarShard | None = None  # the shard being written
        self._name = ""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._forget_previous_run()

    def _forget_previous_run(self) -> None:
        pattern = _name_regex(self.prefix)
        old = read_sizes(self.out_dir)
        kept = {k: v for k, v in old.items() if not pattern.fullmatch(k)}
        if kept != old:
            atomic_write_text(self.out_dir / SIZES_FILE, json.dumps(kept, indent=1, sort_keys=True))
        for path in self.out_dir.iterdir():
            if pattern.fullmatch(path.name):
                path.unlink()

    # ------------------------------------------------------------------ one shard at a time

    def _open_shard(self) -> None:
        self._name = shard_name(self.prefix, len(self.sizes), self.digits)
        self._shard = TarShard(self.out_dir / self._name).__enter__()

    def _finish_shard(self) -> None:
        assert self._shard is not None
        self._shard.__exit__(None, None, None)  # closes the tar, fsyncs, renames into place
        self.sizes[self._name] = self._shard.count
        self._shard = None

    def _abort_shard(self, exc: BaseException) -> None:
        if self._shard is not None:
            self._shard.__exit__(type(exc), exc, exc.__traceback__)  # deletes the temporary file
            self._shard = None

    # ------------------------------------------------------------------ public API

    def write(self, sample: dict[str, Any]) -> int:
        """Add one sample (``__key__`` plus ``ext: bytes | str`` members); returns its idx."""
        key = _check_key(sample.get("__key__"))
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if "idx" in sample:
            raise ValueError("'idx' is assigned by ShardWriter; do not pass it")
        members = {ext: _member_bytes(key, ext, v) for ext, v in sample.items() if ext != "__key__"}
        if not members:
            raise ValueError(f"sample {key!r} has no members besides '__key__'")
        if self._shard is None:
            self._open_shard()
        idx = self.next_idx
        members["idx"] = str(idx).encode()
        assert self._shard is not None
        self._shard.add(key, members)
        self._keys.add(key)
        self.next_idx += 1
        if self._shard.count >= self.maxcount:
            self._finish_shard()
        return idx

    def close(self) -> dict[str, int]:
        """Finish the last shard and list this writer's shards in ``sizes.json``."""
        if self._shard is not None:
            self._finish_shard()
        write_sizes(self.out_dir, self.sizes)
        return dict(self.sizes)

    def __enter__(self) -> ShardWriter:  # noqa: PYI034 (py3.10: no typing.Self)
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
        else:
            self._abort_shard(exc)
