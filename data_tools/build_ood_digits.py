"""scikit-learn's handwritten digits -> an out-of-domain zero-shot set (10 classes, 1,797 images).

Source: ``sklearn.datasets.load_digits()``, the UCI "Optical recognition of handwritten digits"
test set that ships inside scikit-learn (no download): (1797, 8, 8) ink levels 0..16 and labels
0-9. Each image is written as dark ink on white (255 - 255 * level / 16), enlarged 4x with
nearest-neighbour to 32x32 px (no detail added; a size that every viewer shows). Neither
training source (emoji, openclipart) nor Animal-MNIST holds handwriting, so it measures
transfer. Class names are the digits, as in CLIP_benchmark's MNIST; the prompts are
CLIP_benchmark's MNIST prompt plus a few for handwriting. Layout: ``data_tools/ood.py``.

    clipkit data build ood-digits --out data/ood_digits
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from clipkit.data.builders import BUILDERS
from data_tools.common import completed_build
from data_tools.ood import png, write_test_split

CLASSNAMES = [str(d) for d in range(10)]
TEMPLATES = [
    'a photo of the number: "{c}".',
    "a handwritten digit {c}.",
    "the number {c}, written by hand.",
    "a low resolution image of the digit {c}.",
    "a black and white drawing of the number {c}.",
]
SCALE = 4


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) uint8 ink levels 0..16, labels (1797,) int64), checked."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    if images.shape[1:] != (8, 8) or images.min() < 0 or images.max() > 16:
        raise ValueError(
            f"unexpected scikit-learn digits: {images.shape}, range {images.min()}..{images.max()}"
        )
    if set(np.unique(labels).tolist()) != set(range(10)):
        raise ValueError(f"unexpected scikit-learn digit labels: {np.unique(labels)}")
    return images.astype(np.uint8), labels.astype(np.int64)


def to_image(levels: np.ndarray) -> Image.Image:
    """(8, 8) ink levels 0..16 -> (32, 32) grayscale, dark ink on white."""
    gray = (255 - np.round(levels.astype(np.float64) * 255 / 16)).astype(np.uint8)
    return Image.fromarray(gray).resize((8 * SCALE, 8 * SCALE), Image.NEAREST)


def _samples(images: np.ndarray, labels: np.ndarray, order: np.ndarray) -> Iterator[dict]:
    for i in order.tolist():
        yield {"__key__": f"{i:04d}", "png": png(to_image(images[i])), "cls": str(int(labels[i]))}


@BUILDERS.register("ood-digits")
def build(out_dir: str | Path, shard_size: int = 1000, seed: int = 0) -> dict[str, int]:
    """Write the zero-shot set (samples in a seeded order, keys = source index); a complete
    identical build is kept. Returns ``{"test", "test_shards", "classes"}``."""
    out = Path(out_dir)
    params = {"shard_size": shard_size, "seed": seed, "scale": SCALE}
    if (done := completed_build(out, params, ("test",))) is not None:
        return done
    images, labels = load_arrays()
    order = np.random.default_rng(seed).permutation(len(images))
    return write_test_split(out, _samples(images, labels, order), params, shard_size, CLASSNAMES, TEMPLATES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/ood_digits", help="output folder (default: data/ood_digits)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    print(f"ood-digits: {build(args.out, args.shard_size)} under {args.out}")


if __name__ == "__main__":
    main()
