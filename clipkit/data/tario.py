"""Read webdataset tars as a stream of samples, and tell a whole shard from a damaged one.

Why not ``tarfile``: in stream mode it ends *silently* when an archive is cut at a member
boundary or hits a garbage header after the first member, so a half-copied shard reads as a
short, healthy one. This reader requires the end-of-archive marker (a zero block) and checks
every header checksum; anything else raises ``TarDamaged`` after yielding what was readable.

Formats: ustar / GNU / pax headers (long names via pax ``path`` or GNU ``L`` records), plain
or gzip-compressed. Only regular files are yielded; directories and links are skipped.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator
from typing import IO

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
GZIP_MAGIC = b"\x1f\x8b"
REGULAR = (b"0", b"\0", b"7")


class TarDamaged(Exception):
    """The archive is truncated or corrupt at some point; members before it were yielded."""


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    # A pipe or socket may return short reads before the end; keep reading until n or EOF.
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except ValueError:  # not even an octal number: garbage
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    if sum(blanked) == stored:
        return True
    return sum(b - 256 if b > 127 else b for b in blanked) == stored  # signed: some old writers


def _header_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    # Records are "<len> <key>=<value>\n", len counting the whole record.
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _skip(stream: IO[bytes], n: int) -> bool:
    """Skip n bytes; False when the stream visibly ended first."""
    if isinstance(stream, io.BufferedReader) and stream.seekable():
        # Seeking past the end is allowed; the next header read then finds the truncation.
        stream.seek(n, io.SEEK_CUR)
        return True
    while n > 0:
        got = len(_read_exact(stream, min(n, 1 << 20)))
        if got == 0:
            return False
        n -= got
    return True


def _maybe_gunzip(stream: IO[bytes]) -> IO[bytes]:
    if isinstance(stream, io.BufferedReader) and stream.peek(2)[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=stream)  # type: ignore[return-value]
    return stream


def iter_tar(stream: IO[bytes], want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member name, data)`` for regular files; ``data`` is b"" where ``want`` says no.

    Raises ``TarDamaged`` (after yielding every complete member before the damage) when a
    header is corrupt, a member is cut short, or the stream ends without the zero block.
    """
    stream = _maybe_gunzip(stream)
    long_name, pax_size, offset = None, None, 0
    while True:
        header = _read_exact(stream, BLOCK)
        if header == ZERO_BLOCK:
            return
        if len(header) < BLOCK:
            where = "is empty" if offset == 0 else f"ends at byte {offset} without the end-of-archive marker"
            raise TarDamaged(f"archive {where} (truncated?)")
        if not _checksum_ok(header):
            raise TarDamaged(f"corrupt tar header at byte {offset}")
        name = long_name or _header_name(header)
        try:
            size = _number(header[124:136]) if pax_size is None else pax_size
        except ValueError:
            raise TarDamaged(f"corrupt size field in the tar header at byte {offset}") from None
        kind = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        offset += BLOCK + padded
        keep = kind in REGULAR and (want is None or want(name))
        if kind in (b"x", b"L") or keep:
            data = _read_exact(stream, size)
            if len(data) < size or not _skip(stream, padded - size):
                raise TarDamaged(f"member {name!r} is cut short (truncated archive)")
        elif not _skip(stream, padded):
            raise TarDamaged(f"member {name!r} is cut short (truncated archive)")
        if kind == b"x":  # pax header: applies to the next member
            try:
                records = _pax_records(data)
                pax_size = int(records["size"]) if "size" in records else None
            except ValueError:  # includes UnicodeDecodeError
                raise TarDamaged(f"corrupt pax header for member {name!r}") from None
            long_name = records.get("path")
            continue
        if kind == b"L":  # GNU long name: applies to the next member
            long_name, pax_size = data.rstrip(b"\0").decode("utf-8", "surrogateescape"), None
            continue
        long_name = pax_size = None
        if kind in REGULAR:
            yield name, (data if keep else b"")


def split_name(name: str) -> tuple[str, str] | None:
    """``"a/b.seg.png" -> ("a/b", "seg.png")`` as webdataset does: key ends at the basename's first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None  # no extension (or a dotfile): not a sample member
    return name[:dot], name[dot + 1 :].lower()


class DuplicateMember(Exception):
    """The same ``key.ext`` appears twice in one sample."""


def iter_samples(
    stream: IO[bytes], want: Callable[[str], bool] | None = None
) -> Iterator[dict[str, bytes] | DuplicateMember]:
    """Group consecutive members by key into ``{"__key__": key, ext: bytes, ...}`` dicts.

    ``want(ext)`` selects which members' bytes are read; the others are skipped unread. A
    sample holding the same extension twice is yielded as a ``DuplicateMember`` instance so
    the caller can count it and go on. ``TarDamaged`` propagates; the sample being
    assembled when the damage is found is dropped (it may be incomplete).
    """
    for _number, sample in iter_numbered_samples(stream, want):
        yield sample


def iter_numbered_samples(
    stream: IO[bytes], want: Callable[[str], bool] | None = None, select: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, dict[str, bytes] | DuplicateMember]]:
    """``iter_samples`` with each sample's number in the archive (0-based, duplicates included).

    ``select(number)`` (pure: it is asked more than once per sample) picks the samples that
    are read and yielded; the others are counted but neither read nor yielded, so a reader
    can jump to sample ``n`` of a local shard by seeking over the members before it.
    """
    number, key_now = -1, None

    def name_want(name: str) -> bool:
        nonlocal number, key_now
        parts = split_name(name)
        if parts is None:
            return False
        if parts[0] != key_now:  # the same grouping as the loop below, one member earlier
            key_now, number = parts[0], number + 1
        return (select is None or select(number)) and (want is None or want(parts[1]))

    current: dict[str, bytes] | None = None
    seen: set[str] = set()  # extensions of the current sample, read or not
    duplicate, n, key = None, -1, None
    plain = want is None and select is None
    for name, data in iter_tar(stream, None if plain else name_want):
        parts = split_name(name)
        if parts is None:
            continue
        if parts[0] != key:
            if current is not None:
                yield n, duplicate or current
            key, n = parts[0], n + 1
            current = {"__key__": key} if select is None or select(n) else None  # type: ignore[dict-item]
            seen, duplicate = set(), None
        if current is None:
            continue
        ext = parts[1]
        if ext in seen:
            duplicate = DuplicateMember(f"member '{key}.{ext}' appears twice")
        seen.add(ext)
        if want is None or want(ext):
            current[ext] = data
    if current is not None:
        yield n, duplicate or current


def _wanted(name: str, want: Callable[[str], bool]) -> bool:
    parts = split_name(name)
    return parts is not None and want(parts[1])


def start_problem(stream: IO[bytes]) -> str | None:
    """Why ``stream`` does not start like a tar archive (plain or gzip), or None; reads one block."""
    head = _read_exact(stream, BLOCK)
    if head[:2] == GZIP_MAGIC:
        return None  # the checksum is inside the compressed stream; reading decides
    if len(head) < BLOCK:
        return "is empty" if not head else f"is {len(head)} bytes, shorter than one tar block"
    if head == ZERO_BLOCK:
        return None  # an empty archive: readable, holds no sample
    if not _checksum_ok(head):
        return "does not start with a tar header (bad checksum)"
    return None
