"""Openclipart clip art with captions from its SVG metadata -> train / val webdataset shards.

Source: Debian's ``openclipart-png`` and ``openclipart-svg`` packages,
``/usr/share/openclipart/{png,svg}/<category>/.../<name>.{png,svg}``: 8,121 PNG paths, each with
an SVG at the same relative path; about 1,200 are symlinks filing one drawing under a second
category, so a drawing is taken once, under its first path in sorted order (then
exact-duplicate pixels are dropped by the build's dedup, and counted).

Caption = the SVG's Dublin Core title plus its keywords (``dc:subject``), e.g.
``svg/animals/mammals/dogs/bored_dog_01.svg`` -> ``"Bored dog: mammal, animal"``: underscores
become spaces, keywords already in the title and the packaging tags ``unsorted`` / ``hash``
are left out, at most 8 keywords. An SVG with neither title nor keywords (or unparsable XML)
gives no caption: the item is dropped as ``missing_caption`` and listed in the status parquet.

Images: the PNGs (RGBA, up to ~1,200 px) composited on white, longest side <= 256 px, JPEG
quality 90. The split is a hash of the relative path (~10% val), and samples are written in
hash order so every shard mixes all categories. Output per split: ``clipkit data build``'s
layout (``shard-NNNNNN.tar`` + ``.parquet``, ``sizes.json``, ``_stats.json``). Re-running
keeps finished shards (incremental), so an interrupted build resumes and a complete one is a
no-op.

    python -m data_tools.build_openclipart --out data/openclipart
    # recipe: data.train=data/openclipart/train data.val=data/openclipart/val
"""

from __future__ import annotations

import argparse
import io
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from clipkit.data.atomic import atomic_write_bytes, atomic_write_text
from clipkit.data.build import BuildOptions, build_shards
from clipkit.data.builders import BUILDERS
from clipkit.data.imageops import ImageOptions
from clipkit.data.sources import SourceItem
from data_tools.common import key_hash

ROOT = Path("/usr/share/openclipart")
NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
SKIP_KEYWORDS = {"unsorted", "hash", "none", ""}
MAX_KEYWORDS = 8
MAX_SILHOUETTE_PIXELS = 40_000_000


def _clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", (text or "").replace("_", " ")).strip()


def svg_metadata(path: str | Path) -> tuple[str, list[str]]:
    """(title, keywords) from the SVG's ``<metadata>`` (cc:Work); ("", []) when absent or unparsable."""
    try:
        for _, el in ET.iterparse(path, events=("end",)):
            if el.tag.endswith("}Work"):
                title = el.find("dc:title", NS)
                words = [li.text for li in el.findall("dc:subject/rdf:Bag/rdf:li", NS)]
                return _clean(title.text if title is not None else ""), [_clean(w) for w in words if w]
            if el.tag.endswith("}metadata"):
                break
    except (ET.ParseError, OSError, UnicodeDecodeError):
        pass
    return "", []


def caption_of(title: str, keywords: list[str]) -> str | None:
    """``"Bored dog", ["mammal", "dog", "animal"]`` -> ``"Bored dog: mammal, animal"``."""
    in_title = set(title.lower().split())
    kept: list[str] = []
    for word in keywords:
        w = word.lower()
        if w in SKIP_KEYWORDS or w in in_title or w in kept:
            continue
        kept.append(w)
    kept = kept[:MAX_KEYWORDS]
    if title and kept:
        return f"{title}: {', '.join(kept)}"
    return title or (", ".join(kept) if kept else None)


def clipart_pairs(root: str | Path = ROOT) -> list[tuple[str, Path, Path]]:
    """[(relative path without suffix, png, svg)], one per distinct drawing, sorted by path."""
    root = Path(root)
    pngs = sorted((root / "png").rglob("*.png"))
    if not pngs:
        raise FileNotFoundError(
            f"no PNGs under {root / 'png'}; install the Debian packages openclipart-png and openclipart-svg"
        )
    seen: set[Path] = set()
    pairs = []
    for png in pngs:
        rel = png.relative_to(root / "png").with_suffix("")
        svg = root / "svg" / rel.with_suffix(".svg")
        real = png.resolve()
        if real in seen or not svg.is_file():
            continue
        seen.add(real)
        pairs.append((rel.as_posix(), png, svg))
    return pairs


def _items(pairs: list[tuple[str, Path, Path]]) -> list[SourceItem]:
    return [
        SourceItem(i, str(png), (caption_of(*svg_metadata(svg)),)) for i, (_, png, svg) in enumerate(pairs)
    ]


def silhouette(png: Path) -> np.ndarray | None:
    """The drawing's alpha mask, white shape on black (H, W) uint8; None when the PNG has no
    transparent background to cut the shape from (every pixel opaque, or none) or is over
    ``MAX_SILHOUETTE_PIXELS``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size checked below
        try:
            img = Image.open(png)
        except Image.DecompressionBombError:  # the shard build drops these as too large
            return None
    with img:
        if "A" not in img.getbands() and "transparency" not in img.info:
            return None
        if img.width * img.height > MAX_SILHOUETTE_PIXELS:
            return None
        alpha = np.asarray(img.convert("RGBA"))[:, :, 3]  # (H, W)
    mask = alpha >= 128
    if mask.all() or not mask.any():
        return None
    return np.where(mask, 255, 0).astype(np.uint8)


def _silhouette_items(pairs: list[tuple[str, Path, Path]], folder: Path) -> tuple[list[SourceItem], int]:
    """(items whose images are the drawings' silhouettes, written once under ``folder``; number of
    drawings without one). Keys follow the list position, as ``_items``'s do."""
    items, skipped = [], 0
    for rel, png, svg in pairs:
        out = folder / f"{rel}.png"
        if not out.is_file():
            mask = silhouette(png)
            if mask is None:
                skipped += 1
                continue
            buf = io.BytesIO()
            Image.fromarray(mask, mode="L").save(buf, format="PNG")
            atomic_write_bytes(out, buf.getvalue())
        items.append(SourceItem(len(items), str(out), (caption_of(*svg_metadata(svg)),)))
    return items, skipped


@BUILDERS.register("openclipart")
def build(
    out_dir: str | Path,
    val_fraction: float = 0.1,
    max_side: int = 256,
    shard_size: int = 1000,
    limit: int | None = None,
    root: str | Path = ROOT,
    threads: int = 4,
    silhouettes: bool = False,
) -> dict[str, object]:
    """Write ``<out_dir>/{train,val}/``; returns counts and the dropped items by reason.

    ``limit``: only the first N drawings in hash order (a quick, category-mixed subset).
    ``silhouettes``: also ``<out_dir>/train_silhouettes/``, each train drawing's alpha mask drawn
    white on black with the drawing's caption (drawings without a transparent background have
    none), as the emoji builder adds for emoji: shapes alone, which is what Animal-MNIST-like
    silhouette sets show. A separate folder, so a recipe mixes it in with its own weight.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    pairs = sorted(clipart_pairs(root), key=lambda p: key_hash(p[0]))[:limit]
    opts = BuildOptions(
        shard_size=shard_size, image=ImageOptions("keep_ratio", max_side, image_format="jpg", quality=90),
        dedup=True, threads=threads, incremental=True,
    )  # fmt: skip
    counts: dict[str, object] = {}
    for split in ("train", "val"):
        chosen = [p for p in pairs if (key_hash("split:" + p[0]) < val_fraction) == (split == "val")]
        stats = build_shards(
            _items(chosen), Path(out_dir) / split, opts, source=f"openclipart:{root}:{split}"
        )
        counts[split], counts[f"{split}_shards"] = stats["samples"], stats["shards"]
        counts[f"{split}_dropped"] = stats["errors"]
        if split == "train" and silhouettes:
            items, counts["train_no_silhouette"] = _silhouette_items(
                chosen, Path(out_dir) / ".silhouette_png"
            )
            stats = build_shards(
                items,
                Path(out_dir) / "train_silhouettes",
                replace(opts, key_prefix="s"),  # keys apart from train's: a recipe mixes both
                source=f"openclipart:{root}:train:silhouettes",
            )
            counts["train_silhouettes"], counts["train_silhouettes_shards"] = (
                stats["samples"],
                stats["shards"],
            )
    # captioned pairs: `clipkit eval` reads the folder as a retrieval set, as it does emoji's
    atomic_write_text(Path(out_dir) / "dataset_type.txt", "retrieval\n")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/openclipart", help="output folder (default: data/openclipart)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=1000, help="drawings per shard")
    parser.add_argument("--limit", type=int, help="only the first N drawings (hash order)")
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--silhouettes", action="store_true", help="also write train_silhouettes/")
    args = parser.parse_args(argv)
    c = build(
        args.out, args.val_fraction, args.max_side, args.shard_size, args.limit, args.root,
        silhouettes=args.silhouettes,
    )  # fmt: skip
    print(
        f"openclipart: {c['train']} train samples in {c['train_shards']} shards, {c['val']} val samples in "
        f"{c['val_shards']} shards under {args.out}; dropped train {c['train_dropped']}, val {c['val_dropped']}"
    )


if __name__ == "__main__":
    main()
