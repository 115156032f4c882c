"""Sources of image-caption pairs for ``clipkit data build``, each read as a stream of ``SourceItem``.

* a folder of images with sidecar captions (``cats/001.jpg`` + ``cats/001.txt``), walked in
  sorted order;
* a manifest (CSV, TSV, parquet, JSON lines; read by ``clipkit.data.manifest``, which sets
  the NA rule), with an image column (local path or http(s) URL) and one or more caption
  columns named by the caller;
* COCO / Flickr caption JSON in Karpathy's split format (``{"images": [{"filepath",
  "filename", "split", "sentences": [{"raw": ...}]}]}``): one image, several captions;
* a URL list: one URL per line, optionally followed by a tab and a caption.

An item's ``index`` is its position in the source (0, 1, ...); the build derives the stable
sample key from it, so the same source always gives the same keys. Items carry their
captions raw (text, sidecar bytes, a sidecar path, or None for "no caption"): judging them
is the build's job, so every failure is classified and counted in one place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipkit.data.manifest import (
    MANIFEST_SUFFIXES,
    ManifestError,
    find_column,
    is_url,
    read_manifest,
    resolve_path,
)
from clipkit.errors import ClipkitError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
URL_LIST_SUFFIXES = (".txt", ".urls", ".list")

# A raw caption: text (manifest cell), bytes (sidecar content), a sidecar Path to read
# later, or None (no caption at all).
Caption = str | bytes | Path | None


class SourceError(ClipkitError, ValueError):
    """A source that cannot be read as asked (missing file, unknown format, missing column)."""


@dataclass(frozen=True)
class SourceItem:
    index: int  # position in the source; the stable key is derived from it
    ref: str  # local path or http(s) URL of the image
    captions: tuple[Caption, ...]

    @property
    def is_url(self) -> bool:
        return is_url(self.ref)


# ---------------------------------------------------------------------------- folder


def folder_items(root: str | Path, caption_ext: str = "txt") -> Iterator[SourceItem]:
    """Images under ``root`` (recursive, sorted by relative path) with ``<stem>.<caption_ext>``."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"image folder '{root}' does not exist")
    images = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not images:
        raise SourceError(f"folder '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    ext = "." + caption_ext.lstrip(".")
    return (SourceItem(i, str(p), (p.with_suffix(ext),)) for i, p in enumerate(images))


# ---------------------------------------------------------------------------- manifests


def manifest_items(
    path: str | Path, image_col: str, caption_cols: Sequence[str], root: str | Path | None = None
) -> Iterator[SourceItem]:
    """Rows of a manifest (``clipkit.data.manifest``: formats, NA rule); relative paths are under
    ``root``. A missing image cell gives the ref ``""``, a missing caption cell None."""
    path = Path(path)
    try:
        table = read_manifest(path)
        find_column(table, path, "image", [image_col], "choose with --image-col")
        for name in caption_cols:
            find_column(table, path, "caption", [name], "choose with --caption-col")
    except ManifestError as e:
        raise SourceError(str(e)) from None
    base = Path(root) if root is not None else path.parent
    images = table[image_col].tolist()
    captions = [table[c].tolist() for c in caption_cols]
    return (
        SourceItem(i, "" if ref is None else resolve_path(ref, base), tuple(col[i] for col in captions))
        for i, ref in enumerate(images)
    )


def is_karpathy_json(path: Path) -> bool:
    """A ``.json`` file whose top level is an object with an ``images`` list (Karpathy splits)."""
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"{") and b'"images"' in head


def karpathy_items(
    path: str | Path, root: str | Path | None = None, splits: Sequence[str] | None = None
) -> Iterator[SourceItem]:
    """COCO / Flickr30k / Flickr8k captions in Karpathy's format; ``splits`` e.g. ("train", "restval")."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read caption JSON '{path}': {e}") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise SourceError(f"'{path}' is not in Karpathy's format: no top-level 'images' list")
    base = Path(root) if root is not None else path.parent
    wanted = set(splits) if splits else None
    found = {str(im.get("split")) for im in images if isinstance(im, dict)}
    if wanted and not wanted & found:
        raise SourceError(
            f"'{path}' has no images in split(s) {sorted(wanted)}; splits present: {sorted(found)}"
        )
    chosen = [im for im in images if isinstance(im, dict) and (not wanted or str(im.get("split")) in wanted)]
    return (_karpathy_item(i, im, base) for i, im in enumerate(chosen))


def _cell(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def _karpathy_item(index: int, im: dict[str, Any], base: Path) -> SourceItem:
    rel = "/".join(str(p) for p in (im.get("filepath"), im.get("filename")) if p)
    sentences = im.get("sentences") or []
    caps = tuple(_cell(s.get("raw")) if isinstance(s, dict) else _cell(s) for s in sentences)
    return SourceItem(index, resolve_path(rel, base) if rel else "", caps or (None,))


# ---------------------------------------------------------------------------- URL lists


def url_list_items(path: str | Path) -> Iterator[SourceItem]:
    """One URL per line, optionally ``URL<TAB>caption``; blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"URL list '{path}' does not exist")
    return _url_lines(path)


def _url_lines(path: Path) -> Iterator[SourceItem]:
    index = 0
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            url, tab, caption = line.partition("\t")
            yield SourceItem(index, url.strip(), (caption if tab else None,))
            index += 1


# ---------------------------------------------------------------------------- dispatch


def open_source(
    source: str | Path,
    *,
    image_col: str | None = None,
    caption_cols: Sequence[str] = (),
    root: str | Path | None = None,
    splits: Sequence[str] | None = None,
    caption_ext: str = "txt",
) -> tuple[str, Iterator[SourceItem]]:
    """(kind, items) for a folder, manifest, Karpathy JSON or URL list, told apart by type."""
    path = Path(source)
    if path.is_dir():
        return "folder", folder_items(path, caption_ext)
    if not path.is_file():
        raise SourceError(f"source '{source}' is neither a folder nor a file")
    suffix = path.suffix.lower()
    if is_karpathy_json(path):
        return "karpathy", karpathy_items(path, root, splits)
    if suffix in MANIFEST_SUFFIXES:
        if not image_col or not caption_cols:
            raise SourceError(
                f"manifest '{path}': name its image column and caption column(s) with "
                "--image-col COL --caption-col COL [--caption-col COL2 ...]"
            )
        return "manifest", manifest_items(path, image_col, caption_cols, root)
    if suffix in URL_LIST_SUFFIXES:
        return "url_list", url_list_items(path)
    raise SourceError(
        f"source '{source}': unknown file type '{suffix}'; expected a folder, a manifest "
        f"({', '.join(MANIFEST_SUFFIXES)}) or a URL list ({', '.join(URL_LIST_SUFFIXES)})"
    )
