"""Evaluation datasets in tar shards: CLIP_benchmark's local webdataset layout and clipkit's own.

CLIP_benchmark's layout (``ClipBenchmarkWds``):

```
<root>/
  test/0.tar 1.tar ... [nshards.txt]     one folder per split
  classnames.txt                         one class name per line (classification)
  zeroshot_classification_templates.txt  one prompt per line, with "{c}" for the class name
  dataset_type.txt                       optional: "classification" (default) or "retrieval"
```
A sample is the run of tar members sharing a key (the member name up to the first dot
of its base name, as webdataset groups them). Its image is the first of ``.webp``,
``.png``, ``.jpg``, ``.jpeg`` present; a classification sample has ``.cls`` (an integer
label), a retrieval sample ``.txt`` with one caption per line (``str.splitlines``).
This is what ``clip_benchmark/datasets/builder.py::build_wds_dataset`` reads. There,
``nshards.txt`` is mandatory and selects ``0.tar .. (n-1).tar``; here, without it, every
``*.tar`` of the split folder is read in natural order.

clipkit's shards (``ClipkitShards``, written by ``clipkit data build``) are read the same
way from a folder of ``*.tar`` or a shard spec; their metadata files, when present, sit
beside the shards or one folder up.
"""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image

from clipkit.data import decode as data_decode
from clipkit.data import tario
from clipkit.evaluation.source import EvalDataError, EvalSource
from clipkit.registry import suggest

# CLIP_benchmark's `to_tuple(["webp", "png", "jpg", "jpeg"], ...)`: the first present wins.
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
DATASET_TYPES = {"classification": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
ALPHA_MODES = ("white", "drop")
_WANTED = frozenset(IMAGE_EXTS + ("cls", "txt"))
_META = (CLASSNAMES_FILE, TEMPLATES_FILE, TYPE_FILE)


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes, alpha: str = "white") -> Image.Image:
    """Encoded bytes -> RGB PIL image.

    ``alpha="white"`` composites images with transparency on white (the training
    decoder, ``clipkit.data.decode``); ``alpha="drop"`` is PIL's ``convert("RGB")``, which
    discards alpha and keeps the colour stored under transparent pixels: what
    CLIP_benchmark's webdataset "pil" decoder does.
    """
    if alpha not in ALPHA_MODES:
        raise EvalDataError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    if alpha == "white":
        return data_decode.decode_image(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as err:  # noqa: BLE001 -- PIL raises assorted types on bad bytes
        raise data_decode.SampleError("decode_error", f"{type(err).__name__}: {err}") from None


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Samples ``{"__key__": key, ext: bytes, ...}`` of one shard, members grouped by key as
    webdataset does; only image, ``cls`` and ``txt`` members are read. A truncated or
    corrupt shard raises (it would otherwise silently shorten the evaluation set)."""
    with open(path, "rb") as stream:
        try:
            for sample in tario.iter_samples(stream, want=_WANTED.__contains__):
                if isinstance(sample, tario.DuplicateMember):
                    raise EvalDataError(f"{path}: {sample}")
                yield sample
        except tario.TarDamaged as err:
            raise EvalDataError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------- text files


def _lines(path: Path) -> list[tuple[int, str]]:
    # (1-based line number, stripped text) of the non-empty lines, as CLIP_benchmark keeps them.
    text = path.read_text(encoding="utf-8")
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _template_error(where: str, template: str) -> str | None:
    marker = "\x00class\x00"
    try:
        ok = marker in template.format(c=marker)
    except (KeyError, IndexError, ValueError):
        ok = False
    if ok:
        return None
    return (
        f"{where}: template {template!r} must contain '{{c}}' for the class name and no other "
        "'{...}' field (write '{{' and '}}' for literal braces)"
    )


def check_templates(templates: list[str], source: str = "templates") -> list[str]:
    """Raise unless every template formats with ``str.format(c=classname)``."""
    if not templates:
        raise EvalDataError(f"{source}: no templates")
    for i, template in enumerate(templates, 1):
        if err := _template_error(f"{source}, template {i}", template):
            raise EvalDataError(err)
    return templates


# ----------------------------------------------------------------------------- datasets


def _natural(path: Path) -> tuple[int, int | str]:
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.name)


def _read_type(root: Path) -> str | None:
    """``dataset_type.txt`` of ``root`` as "classification" / "retrieval", or None without one."""
    path = root / TYPE_FILE
    if not path.is_file():
        return None
    kind = path.read_text(encoding="utf-8").strip().lower()
    if kind == "multilabel":
        raise EvalDataError(f"{path}: multi-label datasets (mean average precision) are not supported yet")
    if kind not in DATASET_TYPES:
        known = list(DATASET_TYPES)
        raise EvalDataError(f"{path}: unknown dataset type '{kind}';{suggest(kind, known)} known: {known}")
    return kind


def read_classnames(path: Path, needed_for: str = "zero-shot classification") -> list[str]:
    """One class name per line, in label order; blank lines dropped."""
    if not path.is_file():
        raise EvalDataError(
            f"'{path.parent}' has no {path.name}, needed for {needed_for} "
            "(one class name per line, in label order)"
        )
    names = [line for _, line in _lines(path)]
    if not names:
        raise EvalDataError(f"{path}: no class names")
    return names


def read_templates(path: Path) -> list[str]:
    """One prompt per line with ``{c}``; a bad line is named by number."""
    if not path.is_file():
        raise EvalDataError(
            f"'{path.parent}' has no {path.name}, needed for zero-shot classification "
            "(one prompt per line, e.g. 'a photo of a {c}.')"
        )
    numbered = _lines(path)
    for lineno, template in numbered:
        if err := _template_error(f"{path}:{lineno}", template):
            raise EvalDataError(err)
    return check_templates([t for _, t in numbered], str(path))


class TarSource(EvalSource):
    """Webdataset tar shards of image + ``.cls`` (classification) or ``.txt`` (retrieval) samples.

    Iterating yields ``{"image": PIL RGB, "label": int, "key", "order"}`` or
    ``{"image", "captions": list[str], "key", "order"}``; see ``source.EvalSource`` for how
    ranks and loader workers divide the shards. Class names and templates are read from
    ``meta_dir`` (``classnames.txt``, ``zeroshot_classification_templates.txt``) on first use.
    """

    def __init__(self, shards: list[Path], dataset_type: str, meta_dir: Path, name: str, alpha: str):
        if alpha not in ALPHA_MODES:
            raise EvalDataError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
        self.shards, self.dataset_type, self.meta_dir = shards, dataset_type, meta_dir
        self.name, self.alpha = name, alpha
        self.task = DATASET_TYPES[dataset_type]

    @cached_property
    def classnames(self) -> list[str]:
        return read_classnames(self.meta_dir / CLASSNAMES_FILE)

    @cached_property
    def templates(self) -> list[str]:
        return read_templates(self.meta_dir / TEMPLATES_FILE)

    def units(self) -> list[Path]:
        return self.shards

    def read_unit(self, unit: Path) -> Iterator[dict[str, Any]]:
        return iter_tar_samples(unit)

    def describe(self) -> str:
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.shards]
        return f"{stats}|{self.dataset_type}|alpha={self.alpha}"

    def decode(self, raw: dict[str, Any], unit: Path) -> dict[str, Any]:
        key = raw["__key__"]
        where = f"{unit}: sample '{key}'"
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            found = sorted(k for k in raw if k != "__key__")
            raise EvalDataError(f"{where} has no image (looked for {', '.join(IMAGE_EXTS)}; found {found})")
        try:
            image = decode_image(raw[ext], self.alpha)
        except data_decode.SampleError as err:
            raise EvalDataError(f"{where}: cannot decode .{ext}: {err}") from None
        field = "txt" if self.dataset_type == "retrieval" else "cls"
        if field not in raw:
            raise EvalDataError(f"{where} has no .{field} member")
        if field == "txt":
            return {"image": image, "captions": raw["txt"].decode("utf-8").splitlines(), "key": key}
        try:
            label = int(raw["cls"])
        except ValueError:
            raise EvalDataError(f"{where}: .cls must be an integer, got {raw['cls'][:20]!r}") from None
        return {"image": image, "label": label, "key": key}


class ClipBenchmarkWds(TarSource):
    """One split of a CLIP_benchmark local webdataset folder (module docstring)."""

    def __init__(self, root: str | Path, split: str = "test", alpha: str = "white"):
        self.root = Path(root)
        self.split = split
        if alpha not in ALPHA_MODES:
            raise EvalDataError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
        if not self.root.is_dir():
            raise EvalDataError(f"evaluation dataset folder '{self.root}' does not exist")
        kind = _read_type(self.root) or "classification"
        super().__init__(self._find_shards(), kind, self.root, self.root.name, alpha)

    def __repr__(self) -> str:
        return f"ClipBenchmarkWds('{self.root}', split='{self.split}', {len(self.shards)} shards)"

    def _find_shards(self) -> list[Path]:
        folder = self.root / self.split
        if not folder.is_dir():
            splits = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise EvalDataError(f"'{self.root}' has no split folder '{self.split}/'; splits found: {splits}")
        nshards_file = folder / "nshards.txt"
        if nshards_file.is_file():
            text = nshards_file.read_text().strip()
            if not text.isdigit():
                raise EvalDataError(f"{nshards_file}: expected a shard count, got {text!r}")
            shards = [folder / f"{i}.tar" for i in range(int(text))]
            missing = [p.name for p in shards if not p.is_file()]
            if missing:
                raise EvalDataError(f"{nshards_file} says {text} shards but {folder} lacks {missing[:5]}")
        else:
            shards = sorted(folder.glob("*.tar"), key=_natural)
        if not shards:
            raise EvalDataError(f"no shards in '{folder}': expected *.tar files (and optionally nshards.txt)")
        return shards


class ClipkitShards(TarSource):
    """clipkit's own shards (``clipkit data build``, ``ShardWriter``): a folder of ``*.tar`` or a
    shard spec (brace pattern, ``::`` list). The task comes from ``dataset_type.txt`` beside the
    shards, else from the first sample: ``.cls`` -> classification, ``.txt`` -> retrieval."""

    def __init__(self, spec: str, alpha: str = "white", name: str | None = None):
        from clipkit.data.urls import ShardSpecError, expand_urls, is_local

        try:
            urls = expand_urls(spec)
        except ShardSpecError as err:
            raise EvalDataError(str(err)) from None
        if not all(is_local(u) for u in urls):
            raise EvalDataError(f"shards '{spec}': only local shard files can be evaluated")
        shards = [Path(u.removeprefix("file:")).expanduser() for u in urls]
        folder = Path(spec).expanduser() if Path(spec).expanduser().is_dir() else shards[0].parent
        # Metadata files sit beside the shards or one level up (data/emoji/{dataset_type.txt,val/}).
        meta = next((d for d in (folder, folder.parent) if any((d / f).is_file() for f in _META)), folder)
        kind = _read_type(meta) or self._sniff(shards[0])
        self.spec = spec
        super().__init__(shards, kind, meta, name or meta.name, alpha)

    @staticmethod
    def _sniff(shard: Path) -> str:
        for raw in iter_tar_samples(shard):
            if "cls" in raw:
                return "classification"
            if "txt" in raw:
                return "retrieval"
            break
        raise EvalDataError(
            f"cannot tell the task of '{shard}': its first sample has neither .cls nor .txt "
            "(or the shard is empty); add dataset_type.txt (classification / retrieval)"
        )

    def __repr__(self) -> str:
        return f"ClipkitShards('{self.spec}', {len(self.shards)} shards)"


# ----------------------------------------------------------------------------- writing


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_clip_benchmark_wds(
    root: str | Path,
    samples: Iterable[dict[str, Any]],
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    split: str = "test",
    samples_per_shard: int = 1000,
    image_format: str = "png",
) -> int:
    """Write ``samples`` (``{"image": PIL, "label": int}`` or ``{"image", "captions"}``,
    optional ``"key"``) as a CLIP_benchmark local webdataset split; returns the count.

    Class names and templates, when given, are written beside the split; a dataset whose
    first sample has ``"captions"`` is marked ``retrieval`` in ``dataset_type.txt``.
    """
    root = Path(root)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
    stream = iter(samples)
    n, shard, retrieval = 0, 0, False
    while chunk := list(itertools.islice(stream, samples_per_shard)):
        retrieval = retrieval or (n == 0 and "captions" in chunk[0])
        with tarfile.open(folder / f"{shard}.tar", "w") as tar:
            for sample in chunk:
                key = sample.get("key", f"s{n:08d}")
                buf = io.BytesIO()
                sample["image"].save(buf, format={"jpg": "JPEG"}.get(ext, ext.upper()))
                _add(tar, f"{key}.{ext}", buf.getvalue())
                if retrieval:
                    _add(tar, f"{key}.txt", "\n".join(sample["captions"]).encode("utf-8"))
                else:
                    _add(tar, f"{key}.cls", str(int(sample["label"])).encode())
                n += 1
        shard += 1
    (folder / "nshards.txt").write_text(f"{shard}\n")
    (root / TYPE_FILE).write_text("retrieval\n" if retrieval else "classification\n")
    if classnames is not None:
        (root / CLASSNAMES_FILE).write_text("".join(f"{c}\n" for c in classnames), encoding="utf-8")
    if templates is not None:
        (root / TEMPLATES_FILE).write_text("".join(f"{t}\n" for t in templates), encoding="utf-8")
    return n
