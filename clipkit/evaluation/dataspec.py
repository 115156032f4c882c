"""``open_dataset(spec)``: an evaluation dataset from a path, in any supported layout.

A spec is ``[FORMAT:]PATH[:SPLIT]``. Formats, and how they are recognised without a prefix:

- ``wds``      CLIP_benchmark's local webdataset folder: a folder with ``classnames.txt``,
               ``dataset_type.txt`` or ``<split>/nshards.txt``, and ``<split>/*.tar``;
- ``shards``   clipkit's own shards: a folder holding ``*.tar`` itself, or a brace pattern /
               ``::``-joined list of tar files;
- ``manifest`` a manifest file (``clipkit.data.manifest``): ``.csv``, ``.tsv``, ``.parquet``,
               ``.jsonl``, ...;
- ``folder``   a folder of class folders of images (``<root>/[<split>/]<class>/<image>``).

The split defaults to ``test`` for ``wds``; for the others the whole dataset is used unless a
split is given.
"""

from __future__ import annotations

from pathlib import Path

from clipkit.data.manifest import SUFFIX_HELP, is_manifest
from clipkit.evaluation.source import EvalDataError, EvalSource
from clipkit.registry import suggest

FORMATS = ("wds", "shards", "manifest", "folder")


def split_spec(spec: str) -> tuple[str | None, str, str | None]:
    """``[FORMAT:]PATH[:SPLIT]`` -> (format or None, path, split or None)."""
    fmt = None
    head, sep, rest = spec.partition(":")
    if sep and head in FORMATS:
        fmt, spec = head, rest
    if Path(spec).expanduser().exists():  # a path that itself holds ':'
        return fmt, spec, None
    path, sep, split = spec.rpartition(":")
    if sep and path and split and "/" not in split:
        return fmt, path, split
    return fmt, spec, None


def _looks_wds(root: Path) -> bool:
    markers = ("classnames.txt", "dataset_type.txt", "zeroshot_classification_templates.txt")
    return any((root / m).is_file() for m in markers)


def _has_class_folders(folder: Path) -> bool:
    """A sub-folder holding an image file (at any depth)."""
    from clipkit.evaluation.folders import IMAGE_SUFFIXES

    subs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return any(f.suffix.lower() in IMAGE_SUFFIXES for d in subs for f in d.rglob("*"))


def detect_format(path: str, split: str | None) -> str:
    p = Path(path).expanduser()
    if "{" in path or "::" in path:
        return "shards"
    if p.is_file():
        if is_manifest(p):
            return "manifest"
        if p.suffix == ".tar":
            return "shards"
        raise EvalDataError(f"'{path}' is a file but not a manifest ({SUFFIX_HELP}) or a .tar shard")
    if not p.is_dir():
        head = path.split(":", 1)[0] if ":" in path else ""
        hint = (
            f" ('{head}:' is not a format;{suggest(head, list(FORMATS))} formats: {FORMATS})" if head else ""
        )
        raise EvalDataError(f"evaluation dataset '{path}' does not exist{hint}")
    if any(p.glob("*.tar")):
        return "shards"
    split_dir = p / (split or "test")
    if (split_dir / "nshards.txt").is_file() or any(split_dir.glob("*.tar")):
        return "wds"
    if _has_class_folders(split_dir if split and split_dir.is_dir() else p):
        return "folder"
    if _looks_wds(p):
        return "wds"  # let ClipBenchmarkWds name what is missing
    raise EvalDataError(
        f"cannot tell the layout of '{path}': expected a CLIP_benchmark folder (<split>/*.tar + "
        "classnames.txt / dataset_type.txt), a folder of *.tar shards, a folder of class folders, "
        "or a manifest (.csv, .tsv, .parquet, .jsonl, ...); prefix the path with wds:, shards:, folder: "
        "or manifest:"
    )


def open_dataset(
    spec: str, split: str | None = None, alpha: str = "white", fmt: str | None = None, name: str | None = None
) -> EvalSource:
    """The dataset named by ``spec`` (module docstring); ``split`` overrides the spec's own."""
    spec_fmt, path, spec_split = split_spec(spec)
    split = split or spec_split
    fmt = fmt or spec_fmt or detect_format(path, split)
    if fmt not in FORMATS:
        raise EvalDataError(f"unknown dataset format '{fmt}';{suggest(fmt, list(FORMATS))} known: {FORMATS}")
    if fmt == "wds":
        from clipkit.evaluation.datasets import ClipBenchmarkWds

        ds: EvalSource = ClipBenchmarkWds(path, split=split or "test", alpha=alpha)
    elif fmt == "shards":
        from clipkit.evaluation.datasets import ClipkitShards

        if split is not None:
            path = str(Path(path) / split)
        ds = ClipkitShards(path, alpha=alpha)
    elif fmt == "manifest":
        from clipkit.evaluation.folders import ManifestSource

        ds = ManifestSource(path, split=split, alpha=alpha)
    else:
        from clipkit.evaluation.folders import ImageFolderSource

        ds = ImageFolderSource(path, split=split, alpha=alpha)
    if name:
        ds.name = name
    return ds
