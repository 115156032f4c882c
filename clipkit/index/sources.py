"""What ``clipkit index embed`` reads: webdataset shards, an image folder, or a manifest.

Each input is cut into parts, the unit of resumable and per-rank work: one part per shard, or
``part_size`` consecutive files of a folder / manifest. ``read_part`` yields ``Sample``s in a
fixed order, each carrying what maps it back to its origin (key, idx, source, shard, offset)
and either its image bytes or the ``SampleError`` that makes it unusable.

    folder:   every image file below it (jpg, jpeg, png, webp, bmp, gif), sorted by path;
              caption from a sibling ``<name>.txt`` when present; key = relative path sans suffix
    manifest: any format of ``clipkit.data.manifest`` (which sets the NA rule) with a ``path``
              (or ``image``) column, relative to the manifest's folder or absolute; optional
              ``key``, ``caption`` (or ``text``; missing = ""), ``idx``
    shards:   a shard spec as for training (``data/x/train-{000000..000009}.tar``, a folder of
              tars, ``::``-joined lists); image from the first of ``image_keys`` present,
              caption from ``caption_key``, source URL from the ``json`` member's ``url``
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipkit.data.decode import SampleError, parse_idx
from clipkit.data.manifest import ManifestError, find_column, int_column, read_manifest, resolve_path
from clipkit.errors import ClipkitError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_IMAGE_HINT = "clipkit index embed needs a 'path' (or 'image') column of image files, relative to its folder"


class SourceError(ClipkitError, ValueError):
    """An input that cannot be read as a folder, manifest or shard spec."""


@dataclass
class Sample:
    key: str
    idx: int
    caption: str
    source: str
    shard: str
    offset: int
    image: bytes | None = None
    error: SampleError | None = None


@dataclass(frozen=True)
class PartSpec:
    shard: str  # tar url, or the folder / manifest path
    start: int  # first item of a folder / manifest slice (0 for a shard)
    stop: int  # one past the last item (-1 for a shard: the whole tar)


class Source(abc.ABC):
    kind = ""

    @abc.abstractmethod
    def describe(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def parts(self) -> list[PartSpec]: ...

    @abc.abstractmethod
    def read_part(self, part: PartSpec, images: bool = True) -> Iterator[Sample]:
        """The part's samples in order; ``images=False`` leaves image bytes unread (text export)."""


def _read_file(path: Path) -> bytes | SampleError:
    try:
        return path.read_bytes()
    except OSError as e:
        return SampleError("unreadable_file", f"{path}: {e.strerror or e}")


def _caption_file(image: Path) -> str:
    txt = image.with_suffix(".txt")
    return txt.read_text(encoding="utf-8-sig").strip() if txt.is_file() else ""


class FolderSource(Source):
    kind = "folder"

    def __init__(self, root: str | Path, part_size: int = 10_000):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise SourceError(f"image folder {root} does not exist")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.files:
            raise SourceError(f"image folder {root} holds no {', '.join(IMAGE_SUFFIXES)} files")
        self.part_size = part_size

    def describe(self) -> dict[str, str]:
        return {"folder": str(self.root)}

    def parts(self) -> list[PartSpec]:
        n = len(self.files)
        return [PartSpec(str(self.root), a, min(a + self.part_size, n)) for a in range(0, n, self.part_size)]

    def read_part(self, part: PartSpec, images: bool = True) -> Iterator[Sample]:
        for i in range(part.start, part.stop):
            path = self.files[i]
            data = _read_file(path) if images else None
            sample = Sample(
                path.relative_to(self.root).with_suffix("").as_posix(), i, "", str(path), part.shard, i
            )
            if isinstance(data, SampleError):
                sample.error = data
            else:
                sample.image, sample.caption = data, _caption_file(path)
            yield sample


class ManifestSource(Source):
    kind = "manifest"

    def __init__(self, path: str | Path, part_size: int = 10_000):
        self.path = Path(path).resolve()
        try:
            df = read_manifest(self.path)
            col = find_column(df, path, "image", ("path", "image"), _IMAGE_HINT)
            n = len(df)
            self.idx = int_column(df, path, "idx") if "idx" in df else list(range(n))
        except ManifestError as e:
            raise SourceError(str(e)) from None
        base = self.path.parent
        self.paths = [None if p is None else resolve_path(p, base) for p in df[col]]
        self.keys = df["key"].tolist() if "key" in df else [f"{i:09d}" for i in range(n)]
        if None in self.keys:
            raise SourceError(f"manifest {path}: the 'key' column is empty in row {self.keys.index(None)}")
        if len(set(self.keys)) != n:
            raise SourceError(f"manifest {path}: the 'key' column has duplicates")
        cap = next((c for c in ("caption", "text") if c in df.columns), None)
        self.captions = [c or "" for c in df[cap]] if cap else [""] * n  # a missing caption is ""
        self.part_size = part_size

    def describe(self) -> dict[str, str]:
        return {"manifest": str(self.path)}

    def parts(self) -> list[PartSpec]:
        n = len(self.paths)
        return [PartSpec(str(self.path), a, min(a + self.part_size, n)) for a in range(0, n, self.part_size)]

    def read_part(self, part: PartSpec, images: bool = True) -> Iterator[Sample]:
        for i in range(part.start, part.stop):
            path = self.paths[i]
            sample = Sample(self.keys[i], self.idx[i], self.captions[i], path or "", part.shard, i)
            if path is None and images:
                data = SampleError("missing_image", f"{self.path}: row {i} has no image path")
            else:
                data = _read_file(Path(path)) if images and path else None
            if isinstance(data, SampleError):
                sample.error = data
            else:
                sample.image = data
            yield sample


class ShardSource(Source):
    kind = "shards"

    def __init__(self, spec: str, caption_key: str = "txt", image_keys: str = "jpg;jpeg;png;webp"):
        from clipkit.data.urls import ShardSpecError, expand_urls

        try:
            self.urls = expand_urls(spec)
        except ShardSpecError as e:
            raise SourceError(str(e)) from None
        self.spec = spec
        self.caption_key = caption_key
        self.image_keys = [k.strip().lower() for k in image_keys.split(";") if k.strip()]

    def describe(self) -> dict[str, str]:
        return {"shards": self.spec}

    def parts(self) -> list[PartSpec]:
        return [PartSpec(url, 0, -1) for url in self.urls]

    def read_part(self, part: PartSpec, images: bool = True) -> Iterator[Sample]:
        from clipkit.data.tario import DuplicateMember, TarDamaged, iter_samples
        from clipkit.data.urls import open_url

        wanted = {*(self.image_keys if images else []), self.caption_key, "json", "idx"}
        offset = 0
        try:
            with open_url(part.shard) as stream:
                for raw in iter_samples(stream, lambda ext: ext in wanted):
                    if isinstance(raw, DuplicateMember):
                        yield Sample(
                            "",
                            -1,
                            "",
                            "",
                            part.shard,
                            offset,
                            error=SampleError("duplicate_member", str(raw)),
                        )
                    else:
                        yield self._sample(raw, part.shard, offset)
                    offset += 1
        except TarDamaged as e:
            # Everything before the damage was yielded; the rest of the shard is lost.
            yield Sample(
                "", -1, "", "", part.shard, offset, error=SampleError("damaged_shard", f"{part.shard}: {e}")
            )
        except OSError as e:
            yield Sample(
                "",
                -1,
                "",
                "",
                part.shard,
                offset,
                error=SampleError("unreadable_shard", f"{part.shard}: {e}"),
            )

    def _sample(self, raw: dict[str, bytes], shard: str, offset: int) -> Sample:
        sample = Sample(raw["__key__"], -1, "", "", shard, offset)  # type: ignore[arg-type]
        try:
            sample.idx = parse_idx(raw.get("idx"))
            cap = raw.get(self.caption_key)
            sample.caption = cap.decode("utf-8-sig", "replace").strip() if cap else ""
            if "json" in raw:
                meta = json.loads(raw["json"])
                sample.source = str(meta.get("url", "")) if isinstance(meta, dict) else ""
            sample.image = next((raw[k] for k in self.image_keys if k in raw), None)
        except SampleError as e:
            sample.error = e
        except ValueError as e:  # json
            sample.error = SampleError("bad_json", str(e))
        return sample


def open_source(
    *,
    shards: str = "",
    folder: str = "",
    manifest: str = "",
    part_size: int = 10_000,
    caption_key: str = "txt",
    image_keys: str = "jpg;jpeg;png;webp",
) -> Source:
    """Exactly one of ``shards``, ``folder`` or ``manifest``."""
    given = [name for name, v in (("--shards", shards), ("--folder", folder), ("--manifest", manifest)) if v]
    if len(given) != 1:
        raise SourceError(f"give exactly one input of --shards, --folder, --manifest (got {given or 'none'})")
    if part_size < 1:
        raise SourceError(f"part size must be >= 1, got {part_size}")
    if shards:
        return ShardSource(shards, caption_key, image_keys)
    if folder:
        return FolderSource(folder, part_size)
    return ManifestSource(manifest, part_size)
