"""Write files so that a reader sees either the old content or the new, never a torn one.

Every writer here puts the data in a hidden temporary file in the *same* directory (a rename
is only atomic within one filesystem), flushes and fsyncs it, ``os.replace``s it over the
final name, then fsyncs the directory so the rename itself survives a power cut. A process
killed half-way leaves at most a ``.<name>.<random>.tmp`` file, which no glob for the final
name matches.

    with atomic_open("ckpt/step_00000100.pt") as f:   # e.g. torch.save(state, f)
        ...
    atomic_write_text("runs/x/metrics.json", json.dumps(m))
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask_mode() -> int:
    # mkstemp creates 0600 files; give the final file the mode a plain open() would.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on clean exit it atomically becomes ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports mode 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8, atomically (see module docstring)."""
    atomic_write_bytes(path, text.encode("utf-8"))
