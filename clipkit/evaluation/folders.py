"""Evaluation datasets from loose image files: a folder per class, or a CSV / parquet manifest.

Image folder (``ImageFolderSource``), as torchvision's ``ImageFolder``::

    <root>/[<split>/]<class name>/<image files, any depth>

Labels are the class folders in sorted order. ``classnames.txt`` at ``<root>`` (one name per
line, in that order) replaces the folder names; without it a folder name is used with ``_``
read as a space. Prompts come from ``<root>/zeroshot_classification_templates.txt`` or the
suite.

Manifest (``ManifestSource``): a table in any format of ``clipkit.data.manifest`` (which sets
the NA rule), one row per image (classification) or per image-caption pair (retrieval), with
columns

    image              path of the image, relative to the manifest's folder (or absolute)
    label | class      integer label, or class name (names are sorted into labels)
    caption | captions one caption per row (rows of the same image are grouped, in order),
                       or all of an image's captions separated by newlines
    split              optional; ``<manifest>:<split>`` keeps only those rows

Class names come from ``classnames.txt`` beside the manifest, the ``class`` column, or the suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from clipkit.data import decode as data_decode
from clipkit.data.manifest import ManifestError, find_column, int_column, read_manifest, resolve_path
from clipkit.evaluation.datasets import (
    ALPHA_MODES,
    CLASSNAMES_FILE,
    TEMPLATES_FILE,
    decode_image,
    read_classnames,
    read_templates,
)
from clipkit.evaluation.source import EvalDataError, EvalSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CHUNK = 256  # records per unit (what one loader worker takes at a time)
IMAGE_COLUMNS = ("image", "image_path", "path", "filepath", "file")
CAPTION_COLUMNS = ("caption", "captions", "text")
IMAGE_HINT = "name the column of image paths, relative to the manifest's folder, one of these"


def _chunks(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [records[i : i + CHUNK] for i in range(0, len(records), CHUNK)]


def _decode_file(path: Path, alpha: str) -> Any:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise EvalDataError(f"cannot read image '{path}': {err}") from None
    try:
        return decode_image(data, alpha)
    except data_decode.SampleError as err:
        raise EvalDataError(f"'{path}': cannot decode the image: {err}") from None


def _stats(paths: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


class _FileSource(EvalSource):
    """Records ``{"__key__", "path", "label" | "captions"}`` in chunks; images decoded on read."""

    records: list[dict[str, Any]]
    alpha: str = "white"
    meta_dir: Path

    @cached_property
    def templates(self) -> list[str]:
        return read_templates(self.meta_dir / TEMPLATES_FILE)

    def units(self) -> list[list[dict[str, Any]]]:
        return _chunks(self.records)

    def read_unit(self, unit: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return iter(unit)

    def decode(self, raw: dict[str, Any], unit: Any) -> dict[str, Any]:
        sample = {k: v for k, v in raw.items() if k not in ("__key__", "path")}
        sample["image"] = _decode_file(raw["path"], self.alpha)
        sample["key"] = raw["__key__"]
        return sample

    def describe(self) -> str:
        rows = [(r["__key__"], r.get("label"), r.get("captions")) for r in self.records]
        return f"{_stats([r['path'] for r in self.records])}|{rows}|alpha={self.alpha}"

    def __len__(self) -> int:
        return len(self.records)


class ImageFolderSource(_FileSource):
    task = "zeroshot_classification"

    def __init__(self, root: str | Path, split: str | None = None, alpha: str = "white"):
        if alpha not in ALPHA_MODES:
            raise EvalDataError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
        self.root, self.alpha, self.meta_dir = Path(root), alpha, Path(root)
        if not self.root.is_dir():
            raise EvalDataError(f"image folder '{self.root}' does not exist")
        folder = self.root
        if split is not None:
            folder = self.root / split
            if not folder.is_dir():
                raise EvalDataError(f"image folder '{self.root}' has no split folder '{split}/'")
        self.split, self.folder, self.name = split, folder, self.root.name
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise EvalDataError(
                f"image folder '{folder}' has no class folders: expected <root>/<class name>/<images>"
            )
        self.class_folders = classes
        self.records = []
        for label, cls in enumerate(classes):
            files = sorted(
                p
                for p in (folder / cls).rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            self.records += [
                {"__key__": str(p.relative_to(folder)), "path": p, "label": label} for p in files
            ]
        if not self.records:
            raise EvalDataError(
                f"image folder '{folder}' is empty: its {len(classes)} class folders hold no images "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )

    @cached_property
    def classnames(self) -> list[str]:
        path = self.root / CLASSNAMES_FILE
        if not path.is_file():
            return [c.replace("_", " ") for c in self.class_folders]
        names = read_classnames(path)
        if len(names) != len(self.class_folders):
            raise EvalDataError(
                f"{path} lists {len(names)} class names but '{self.folder}' has "
                f"{len(self.class_folders)} class folders"
            )
        return names

    def __repr__(self) -> str:
        return f"ImageFolderSource('{self.folder}', {len(self.records)} images, {len(self.class_folders)} classes)"


class ManifestSource(_FileSource):
    def __init__(self, path: str | Path, split: str | None = None, alpha: str = "white"):
        if alpha not in ALPHA_MODES:
            raise EvalDataError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
        self.path, self.alpha, self.split = Path(path), alpha, split
        self.meta_dir, self.name = self.path.parent, self.path.stem
        try:
            table = read_manifest(self.path)
            image_col = find_column(table, self.path, "image", IMAGE_COLUMNS, IMAGE_HINT)
        except ManifestError as err:
            raise EvalDataError(str(err)) from None
        cols = list(table.columns)
        if split is not None:
            if "split" not in cols:
                raise EvalDataError(f"manifest '{self.path}' has no 'split' column to select '{split}' from")
            found = sorted({s for s in table["split"] if s is not None})
            table = table[table["split"] == split]
            if table.empty:
                raise EvalDataError(f"manifest '{self.path}' has no rows of split '{split}'; splits: {found}")
        if table.empty:
            raise EvalDataError(f"manifest '{self.path}' is empty: no rows")
        if table[image_col].isna().any():
            row = table.index[table[image_col].isna()][0]
            raise EvalDataError(f"manifest '{self.path}': row {row} has no image path (column '{image_col}')")
        paths = [Path(resolve_path(p, self.meta_dir)) for p in table[image_col]]
        caption_col = next((c for c in CAPTION_COLUMNS if c in cols), None)
        if caption_col is not None:
            self.task = "zeroshot_retrieval"
            self.records = self._retrieval_records(paths, table[caption_col].tolist())
        elif "label" in cols or "class" in cols:
            self.task = "zeroshot_classification"
            self.records = self._classification_records(paths, table)
        else:
            raise EvalDataError(
                f"manifest '{self.path}' has neither a label column (label / class) nor a caption column "
                f"({' / '.join(CAPTION_COLUMNS)}); columns: {cols}"
            )
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise EvalDataError(
                f"manifest '{self.path}': {len(missing)} of its {len(paths)} images do not exist, "
                f"e.g. '{missing[0]}' (paths are relative to the manifest's folder)"
            )

    def _key(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.meta_dir))
        except ValueError:
            return str(path)

    def _retrieval_records(self, paths: list[Path], captions: list[str | None]) -> list[dict[str, Any]]:
        grouped: dict[Path, list[str]] = {}
        for path, caption in zip(paths, captions):  # a missing caption adds none
            grouped.setdefault(path, []).extend((caption or "").splitlines())
        return [{"__key__": self._key(p), "path": p, "captions": caps} for p, caps in grouped.items()]

    def _classification_records(self, paths: list[Path], table: Any) -> list[dict[str, Any]]:
        if "label" in table.columns:
            try:
                labels = int_column(table, self.path, "label")
            except ManifestError as err:
                raise EvalDataError(str(err)) from None
        else:
            if table["class"].isna().any():
                row = table.index[table["class"].isna()][0]
                raise EvalDataError(f"manifest '{self.path}': row {row} has no class name")
            names = table["class"].tolist()
            self.classnames = sorted(set(names))
            index = {n: i for i, n in enumerate(self.classnames)}
            labels = [index[n] for n in names]
        return [{"__key__": self._key(p), "path": p, "label": y} for p, y in zip(paths, labels)]

    @cached_property
    def classnames(self) -> list[str]:
        return read_classnames(
            self.meta_dir / CLASSNAMES_FILE, "zero-shot classification of a manifest with integer labels"
        )

    def __repr__(self) -> str:
        return f"ManifestSource('{self.path}', split={self.split!r}, {len(self.records)} images)"
