"""Tiny shards and a tiny model config for the training tests; also a subprocess entry point.

    python tests/training_helpers.py RECIPE_JSON [STEP_DELAY_S]

runs ``clipkit.training.loop.train`` on the JSON config tree, sleeping ``STEP_DELAY_S`` after
each optimizer step (so a test can kill it mid-run).
"""

from __future__ import annotations

import io
import json
import multiprocessing
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


def write_shards(
    folder: Path, n_shards: int = 4, per_shard: int = 24, seed: int = 0, start: int = 0, idx: bool = False
) -> str:
    """``folder/train-{start..}.tar`` of random PNGs + captions, keys unique across shards; returns the spec.

    ``idx``: each sample also gets an ``idx`` member, its running number over the shards.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for s in range(start, start + n_shards):
        with wds.TarWriter(str(folder / f"train-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                caption = " ".join(rng.choice(WORDS) for _ in range(3))
                sample = {"__key__": f"s{s:03d}_{i:04d}", "png": png_bytes(rng), "txt": caption}
                if idx:
                    sample["idx"] = str((s - start) * per_shard + i)
                sink.write(sample)
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


def run_training(
    tree: dict[str, Any], step_delay: float = 0.0, stderr: str | None = None, own_group: bool = False
) -> None:
    """Train on a config tree in this process (one torch thread); a test's child-process target.

    Exits with the CLI's code when the run stops on a ``ClipkitError`` (e.g. 143 after SIGTERM).
    ``stderr``: a file that receives this process's stderr. ``own_group``: lead a process group of
    its own (its loader workers join it), so that a test can signal the run as a job scheduler
    or ``timeout`` does: every process of it at once (``os.killpg``).
    """
    import os

    import torch

    if own_group:
        os.setpgid(0, 0)

    if stderr:
        sys.stderr = open(stderr, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
        os.dup2(sys.stderr.fileno(), 2)

    from clipkit.cli.main import leave_process_group
    from clipkit.config import Config, from_dict
    from clipkit.errors import ClipkitError
    from clipkit.training import loop

    torch.set_num_threads(1)
    # A forkserver child inherits the forkserver start method; loader workers fork, as in a
    # plain `clipkit train` on Linux (a forkserver worker unpickles the whole dataset).
    multiprocessing.set_start_method("fork", force=True)
    if step_delay:
        step = loop.train_step

        def slow_step(*args: Any, **kw: Any) -> dict[str, float]:
            out = step(*args, **kw)
            time.sleep(step_delay)
            return out

        loop.train_step = slow_step
    try:
        loop.train(from_dict(Config, tree))
    except ClipkitError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    leave_process_group(0)  # as `clipkit train` does at its end: the ranks leave together


def main(argv: list[str]) -> None:
    from clipkit.cli.main import leave_process_group
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
    leave_process_group(0)


if __name__ == "__main__":
    main(sys.argv[1:])
