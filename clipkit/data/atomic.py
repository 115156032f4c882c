"""Write files so that a reader sees either the old content or the new, never a torn one.

Every writer here puts the data in a hidden temporary file in the *same* directory (a rename
is only atomic within one filesystem), flushes and fsyncs it, ``os.replace``s it over the
final name, then fsyncs the directory so the rename itself survives a power cut. A process
killed half-way leaves at most a ``.<name>.<random>.tmp`` file, which no glob for the final
name matches.

Two writers of one folder would still clear each other's files: ``folder_lock`` lets one
process at a time write a folder (``clipkit data build``).

    with atomic_open("ckpt/step_00000100.pt") as f:   # e.g. torch.save(state, f)
        ...
    atomic_write_text("runs/x/metrics.json", json.dumps(m))
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from clipkit.errors import ClipkitError

WRITE_LOCK = ".clipkit-write.lock"


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


class FolderBusyError(ClipkitError):
    """Another process holds the write lock of a folder."""


def _holder(fd: int, settle_s: float = 0.2) -> str:
    """ " (pid N)" of the lock file's holder, or "" when it names none. A holder writes its pid
    just after it takes the lock, so an empty file is read again for up to ``settle_s``."""
    deadline = time.monotonic() + settle_s
    while True:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if pid.isdigit() or time.monotonic() >= deadline:
            return f" (pid {pid})" if pid.isdigit() else ""
        time.sleep(0.005)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike[str],
    what: str,
    *,
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Let one process at a time write ``folder``: ``file_lock`` on its ``.clipkit-write.lock``.

    Another holder is a ``FolderBusyError`` naming the folder, or, with ``wait``, a wait for it to
    end (``on_wait`` gets a message first). The kernel drops the lock of a killed process, so a
    crash never leaves the folder locked (its stale file is taken over).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / WRITE_LOCK, what, f"writing {folder}", wait=wait, on_wait=on_wait):
        yield


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike[str],
    what: str,
    doing: str,
    *,
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path``, which holds the holder's pid and is
    removed on release. ``what`` (the caller's task) and ``doing`` (what a holder does, e.g.
    "writing <folder>") word the messages: another holder is a ``FolderBusyError``, or, with
    ``wait``, a wait for it to end (``on_wait`` gets a message first). The kernel drops the lock
    of a killed process; its stale file is taken over."""
    path = Path(path)
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                os.close(fd)
                raise FolderBusyError(
                    f"{what}: another clipkit process{holder} is {doing}; wait for it to end "
                    "(or stop it), or write to another folder"
                ) from None
            if on_wait is not None and not told:
                on_wait(f"{what}: another clipkit process{holder} is {doing}; waiting for it to end")
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        # The holder before us removes the file when it lets go: a lock on that removed file
        # guards nothing, so take the lock again on the file that is there now.
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
