"""Animal-MNIST (28x28 animal silhouettes, 10 classes) -> a CLIP_benchmark local webdataset.

Source: the ``animal_mnist`` package's gzip pickles ``data/Animal_MNIST/animal_{data,label}
_version_3.gz``: uint8 images (10000, 28, 28), white silhouette on black, and int64 labels
(10000,), 1,000 per class, stored class by class. The package ships no train/test split, so
all 10,000 form the ``test`` split. Label order (checked by viewing samples of each label;
the package README lists the same, alphabetical): 0 bear, 1 bird, 2 cat, 3 cow, 4 dog,
5 elephant, 6 giraffe, 7 horse, 8 sheep, 9 zebra.

Layout read by CLIP_benchmark's ``build_wds_dataset`` (``--dataset wds/animal_mnist
--dataset_root <out>``) and by clipkit's zero-shot eval:

    <out>/test/0.tar ... 9.tar       <key>.png (28x28 grayscale), <key>.cls ("3"), <key>.idx
    <out>/test/nshards.txt           number of shards (mandatory for CLIP_benchmark)
    <out>/test/sizes.json            samples per shard
    <out>/classnames.txt             one class name per line, in label order
    <out>/zeroshot_classification_templates.txt   one prompt per line, with {c}
    <out>/dataset_type.txt           "classification"

Samples are written in a seeded random order (keys keep the source index, ``00042``) so each
shard holds every class.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from clipkit.data.atomic import atomic_write_text
from clipkit.data.builders import BUILDERS
from clipkit.data.shards import ShardWriter
from data_tools.common import completed_build, finish_build, start_build

CLASSNAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
TEMPLATES = [
    "a photo of a {c}.",
    "a silhouette of a {c}.",
    "a white silhouette of a {c} on a black background.",
    "a black and white drawing of a {c}.",
    "a low resolution image of a {c}.",
    "a pixelated image of a {c}.",
    "the shape of a {c}.",
    "an icon of a {c}.",
]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    # The files are plain numpy arrays; refuse any other global so a tampered file
    # cannot run code.
    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from Animal-MNIST data")
        return super().find_class(module, name)


def data_dir() -> Path:
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "package 'animal_mnist' is not installed; install its data without its heavy "
            "dependencies: pip install --no-deps animal-mnist"
        )
    return Path(spec.origin).parent / "data" / "Animal_MNIST"


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64), checked against the known format."""
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(data_dir() / name, "rb") as f:
            arrays.append(_NumpyOnlyUnpickler(f).load())
    images, labels = arrays
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"unexpected Animal-MNIST images: {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or set(np.unique(labels).tolist()) != set(range(len(CLASSNAMES))):
        raise ValueError(f"unexpected Animal-MNIST labels: shape {labels.shape}, values {np.unique(labels)}")
    return images, labels.astype(np.int64)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # (28, 28) uint8 -> mode "L"
    return buf.getvalue()


@BUILDERS.register("animal-mnist")
def build(out_dir: str | Path, shard_size: int = 1000, seed: int = 0) -> dict[str, int]:
    """Write the layout above; skip if a complete identical build exists.

    Returns ``{"test": n_samples, "test_shards": n_shards, "classes": 10}``.
    """
    out = Path(out_dir)
    params = {"shard_size": shard_size, "seed": seed}
    done = completed_build(out, params, ("test",))
    if done is not None:
        return done
    start_build(out)
    images, labels = load_arrays()
    order = np.random.default_rng(seed).permutation(len(images))
    with ShardWriter(out / "test", prefix="", maxcount=shard_size, digits=0) as writer:
        for i in order.tolist():
            writer.write({"__key__": f"{i:05d}", "png": _png(images[i]), "cls": str(int(labels[i]))})
    atomic_write_text(out / "test" / "nshards.txt", f"{len(writer.sizes)}\n")
    atomic_write_text(out / "classnames.txt", "\n".join(CLASSNAMES) + "\n")
    atomic_write_text(out / "zeroshot_classification_templates.txt", "\n".join(TEMPLATES) + "\n")
    atomic_write_text(out / "dataset_type.txt", "classification\n")
    counts = {"test": len(images), "test_shards": len(writer.sizes), "classes": len(CLASSNAMES)}
    finish_build(out, params, counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="data/animal_mnist", help="output folder (default: data/animal_mnist)"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    args = parser.parse_args(argv)
    counts = build(args.out, args.shard_size, args.seed)
    print(
        f"animal_mnist: {counts['test']} test samples in {counts['test_shards']} shards under {args.out}/test"
    )


if __name__ == "__main__":
    main()
