"""Tiny shards and a tiny model config for the training tests; also a subprocess entry point.

    python tests/training_helpers.py RECIPE_JSON [STEP_DELAY_S]

runs ``clipkit.training.loop.train`` on the JSON config tree, sleeping ``STEP_DELAY_S`` after
each optimizer step (so a test can kill it mid-run).
"""

from __future__ import annotations

import io
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

WORDS = [
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "bird",
    "small",
    "large",
    "happy",
    "sad",
    "face",
    "hand",
    "tree",
    "car",
    "sun",
    "moon",
    "star",
]


def png_bytes(rng: random.Random, size: int = 40) -> bytes:
    arr = np.frombuffer(rng.randbytes(size * size * 3), dtype=np.uint8).reshape(size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int = 4, per_shard: int = 24, seed: int = 0, start: int = 0) -> str:
    """``folder/train-{start..}.tar`` of random PNGs + captions, keys unique across shards; returns the spec."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for s in range(start, start + n_shards):
        with wds.TarWriter(str(folder / f"train-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                caption = " ".join(rng.choice(WORDS) for _ in range(3))
                sink.write({"__key__": f"s{s:03d}_{i:04d}", "png": png_bytes(rng), "txt": caption})
    last = start + n_shards - 1
    return str(folder / f"train-{{{start:06d}..{last:06d}}}.tar")


def tiny_tree(shards: str, out_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Config tree of a tiny open_clip model (locked vision tower -> feature cache) on ``shards``."""
    tree: dict[str, Any] = {
        "model": {
            "vision": {"name": "open_clip:clipkit-tiny-ViT", "weights": "", "locked": True, "image_size": 32},
            # Top block + final norm train; the 49408-token embedding stays frozen (fast steps).
            "text": {
                "name": "open_clip:clipkit-tiny-ViT",
                "weights": "",
                "context_length": 16,
                "locked": True,
                "unlocked_layers": 2,
            },
            "embed_dim": 16,
            "projection": "linear",
        },
        "data": {"train": shards, "batch_size": 8, "workers": 0, "shuffle_buffer": 16},
        "optim": {"lr": 1e-3, "warmup_steps": 3},
        "train": {
            "samples": 196,
            "output_dir": str(out_dir),
            "run_name": "run",
            "checkpoint_every": 5,
            "log_every": 4,
            "keep_last": 2,
        },
    }
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def main(argv: list[str]) -> None:
    from clipkit.config import Config, from_dict
    from clipkit.training import loop

    cfg = from_dict(Config, json.loads(Path(argv[0]).read_text()))
    delay = float(argv[1]) if len(argv) > 1 else 0.0
    if delay:
        step = loop.train_step

        def slow_step(*args: Any, **kw: Any) -> dict[str, float]:
            out = step(*args, **kw)
            time.sleep(delay)
            return out

        loop.train_step = slow_step
    loop.train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
