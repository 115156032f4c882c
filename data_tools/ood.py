"""Shared writer of the out-of-domain evaluation sets (``build_ood_*.py``): a CLIP_benchmark-style
local webdataset that neither training source (emoji, openclipart) nor Animal-MNIST comes from.

    <out>/test/0.tar ...             <key>.png + <key>.cls ("3", zero-shot) or <key>.txt (captions)
    <out>/test/nshards.txt           number of shards (CLIP_benchmark needs it)
    <out>/test/sizes.json            samples per shard
    <out>/classnames.txt             zero-shot only: one class name per line, in label order
    <out>/zeroshot_classification_templates.txt   zero-shot only: one prompt per line, with {c}
    <out>/dataset_type.txt           "classification" or "retrieval"
    <out>/build_info.json            parameters and counts; a complete build with the same
                                     parameters is kept on a rerun
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from clipkit.data.atomic import atomic_write_text
from clipkit.data.shards import ShardWriter
from data_tools.common import finish_build, start_build


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def on_white(image: Image.Image) -> Image.Image:
    """RGB ``image``, its transparent parts composited on white (as clip art is shown)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def write_test_split(
    out: Path,
    samples: Iterable[dict[str, Any]],
    params: dict[str, Any],
    shard_size: int,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
) -> dict[str, int]:
    """Write ``samples`` (``{"__key__", "png", "cls" | "txt"}``) as the layout above; the task is
    zero-shot classification when ``classnames`` are given, else retrieval. Returns the counts."""
    start_build(out)
    with ShardWriter(out / "test", prefix="", maxcount=shard_size, digits=0) as writer:
        for sample in samples:
            writer.write(sample)
    n = sum(writer.sizes.values())
    if n == 0:
        raise ValueError(f"no samples for {out}: is the source package installed?")
    atomic_write_text(out / "test" / "nshards.txt", f"{len(writer.sizes)}\n")
    counts = {"test": n, "test_shards": len(writer.sizes)}
    if classnames is not None:
        atomic_write_text(out / "classnames.txt", "\n".join(classnames) + "\n")
        atomic_write_text(out / "zeroshot_classification_templates.txt", "\n".join(templates or []) + "\n")
        counts["classes"] = len(classnames)
    atomic_write_text(out / "dataset_type.txt", "classification\n" if classnames else "retrieval\n")
    finish_build(out, params, counts)
    return counts
