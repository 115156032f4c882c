"""One timed epoch of a training data loader, for benchmarks/loader_throughput.py.

Runs in either virtualenv and imports clipkit only for ``--tool clipkit``:

* ``--tool clipkit``: ``clipkit.data.build_loader`` (clipkit's ``.venv``);
* ``--tool openclip``: ``open_clip_train.data.get_wds_dataset`` (``.venv-openclip``, webdataset
  0.2.86: open_clip_train crashes with webdataset 1.x).

Both get the same work: OpenCLIP's training transform for a 224 px model
(``image_transform_v2(PreprocessCfg(size=224), is_train=True)``: RandomResizedCrop(224,
scale=(0.9, 1)) bicubic, ToTensor, Normalize with the CLIP mean / std), the same tokenizer
(``open_clip.get_tokenizer("ViT-B-32")``), the same batch size, train mode (shuffling),
``torch.set_num_threads(--threads)`` in this process; loader worker processes run with one
torch thread each (PyTorch's default in workers, and clipkit's ``threads_per_worker=1``).

Prints one JSON line: images delivered, wall seconds from the first ``next()`` to the last
batch, and CPU seconds of this process plus its (joined) loader workers over the same span.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _loader(tool: str, shards: str, samples: int, batch: int, workers: int, preprocess, tokenizer):
    if tool == "clipkit":
        from clipkit.config import DataConfig
        from clipkit.data import build_loader

        cfg = DataConfig(batch_size=batch, workers=workers, shuffle_buffer=1000, threads_per_worker=1)
        return build_loader(cfg, shards, preprocess, tokenizer, train=True, seed=0)
    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(
        train_data=shards, val_data=None, train_num_samples=samples, batch_size=batch,
        workers=workers, seed=0, world_size=1, rank=0, dataset_resampled=False,
        train_data_upsampling_factors=None,
    )  # fmt: skip
    return get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer).dataloader


def run(tool: str, shards: str, samples: int, batch: int, workers: int, threads: int) -> dict:
    import torch
    from open_clip import get_tokenizer
    from open_clip.transform import PreprocessCfg, image_transform_v2

    torch.set_num_threads(threads)
    preprocess = image_transform_v2(PreprocessCfg(size=224), is_train=True)
    tokenizer = get_tokenizer("ViT-B-32")
    loader = _loader(tool, shards, samples, batch, workers, preprocess, tokenizer)
    images = batches = 0
    shape = None
    cpu0, child0, t0 = time.process_time(), _children_cpu(), time.perf_counter()
    it = iter(loader)
    for b in it:
        image = b["image"] if isinstance(b, dict) else b[0]  # clipkit: dict; OpenCLIP: (image, text)
        text = b["text"] if isinstance(b, dict) else b[1]
        images += image.shape[0]
        batches += 1
        shape = [list(image.shape), list(text.shape), str(image.dtype)]
        if images >= samples:
            break
    wall = time.perf_counter() - t0
    cpu_main = time.process_time() - cpu0
    del it, loader  # join the workers so their CPU time is counted
    gc.collect()
    time.sleep(0.2)
    cpu = cpu_main + _children_cpu() - child0
    return {
        "tool": tool, "workers": workers, "images": images, "batches": batches, "wall_s": wall,
        "cpu_s": cpu, "images_per_s": images / wall, "images_per_cpu_s": images / cpu,
        "shapes": shape, "threads": threads, "pid": os.getpid(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tool", choices=["clipkit", "openclip"], required=True)
    p.add_argument("--shards", required=True, help="brace pattern of the shards")
    p.add_argument("--samples", type=int, required=True, help="images to read (about one epoch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    a = p.parse_args(argv)
    if a.tool == "clipkit":
        sys.path.insert(0, a.root)
    print(json.dumps(run(a.tool, a.shards, a.samples, a.batch_size, a.workers, a.threads)))


if __name__ == "__main__":
    main()
