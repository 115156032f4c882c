"""Shards and setups for benchmarks/train_throughput.py: finding (or building) the shards, and
the ``small`` / ``lit`` setups both tools train, with the LiT settings read from clipkit's recipe.
"""

from __future__ import annotations

import argparse
import glob
import io
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from _throughput_common import EMOJI_TRAIN_GLOB, LIT_RECIPE, MAIN_ENV, ROOT, Hparams, Setup

# ----------------------------------------------------------------------------- shards


def count_samples(shard: str) -> int:
    """Samples (keys with a caption and an image member) in one tar shard."""
    keys: dict[str, set[str]] = {}
    with tarfile.open(shard) as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = os.path.join(os.path.dirname(m.name), stem)
            keys.setdefault(key, set()).add(ext.lower())
    img = {"jpg", "jpeg", "png", "webp"}
    return sum(1 for exts in keys.values() if "txt" in exts and exts & img)


def make_synthetic_shards(out_dir: Path, n_samples: int, n_shards: int = 4, size: int = 96) -> list[str]:
    """Small webdataset of coloured shapes with matching captions (jpg + txt members)."""
    import random

    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    colours = {
        "red": (220, 30, 30),
        "green": (30, 180, 60),
        "blue": (40, 70, 220),
        "yellow": (240, 210, 30),
        "purple": (140, 50, 170),
        "orange": (250, 140, 20),
        "black": (10, 10, 10),
        "white": (245, 245, 245),
    }
    shapes = ["circle", "square", "triangle", "cross"]
    rng = random.Random(0)
    per = math.ceil(n_samples / n_shards)
    paths = []
    idx = 0
    for s in range(n_shards):
        path = out_dir / f"train-{s:06d}.tar"
        paths.append(str(path))
        if path.exists() and count_samples(str(path)) == min(per, n_samples - s * per):
            idx += min(per, n_samples - s * per)
            continue
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tf:
            for _ in range(min(per, n_samples - s * per)):
                fg, bg = rng.sample(list(colours), 2)
                shape = rng.choice(shapes)
                im = Image.new("RGB", (size, size), colours[bg])
                d = ImageDraw.Draw(im)
                m = size // 5 + rng.randrange(size // 10)
                box = (m, m, size - m, size - m)
                if shape == "circle":
                    d.ellipse(box, fill=colours[fg])
                elif shape == "square":
                    d.rectangle(box, fill=colours[fg])
                elif shape == "triangle":
                    d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=colours[fg])
                else:
                    w = size // 8
                    d.rectangle((size // 2 - w, m, size // 2 + w, size - m), fill=colours[fg])
                    d.rectangle((m, size // 2 - w, size - m, size // 2 + w), fill=colours[fg])
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                members = {"jpg": buf.getvalue(), "txt": f"a {fg} {shape} on a {bg} background".encode()}
                for ext, data in members.items():
                    ti = tarfile.TarInfo(f"{idx:08d}.{ext}")
                    ti.size = len(data)
                    ti.mtime = 0
                    tf.addfile(ti, io.BytesIO(data))
                idx += 1
        os.replace(tmp, path)
    return paths


# Bumped when ``flatten_shard`` changes what it writes: the private copies are then rewritten.
FLATTEN_VERSION = 1
_IMAGE_EXTS = {"png", "jpg", "jpeg", "webp"}


def flatten_shard(src: str, dst: Path) -> None:
    """Copy one shard, with every image that has transparency or a palette re-encoded as RGB PNG.

    The emoji PNGs are palette images with a transparent index. open_clip's ``convert("RGB")``
    drops the transparency and shows the palette colour under it (a different colour per image),
    while clipkit composites over white: the two tools would train on different pixels. Both read
    these copies, whose pixels are the same under either decoder. Other members are copied byte
    for byte; the file is written under a temporary name and renamed.
    """
    from PIL import Image

    tmp = dst.with_suffix(".tmp")
    with tarfile.open(src) as tin, tarfile.open(tmp, "w") as tout:
        for m in tin:
            if not m.isfile():
                continue
            data = tin.extractfile(m).read()
            ext = m.name.rsplit(".", 1)[-1].lower()
            if ext in _IMAGE_EXTS:
                img = Image.open(io.BytesIO(data))
                if img.mode != "RGB" or "transparency" in img.info:
                    rgba = img.convert("RGBA")
                    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    canvas.alpha_composite(rgba)
                    buf = io.BytesIO()
                    canvas.convert("RGB").save(buf, format="PNG")
                    data = buf.getvalue()
                    m.name = m.name.rsplit(".", 1)[0] + ".png"
            info = tarfile.TarInfo(m.name)
            info.size, info.mtime, info.mode = len(data), m.mtime, m.mode
            tout.addfile(info, io.BytesIO(data))
    os.replace(tmp, dst)


def private_copy(paths: list[str], dest: Path) -> list[str]:
    """Copy the shards into the benchmark's own folder, images flattened to RGB (``flatten_shard``).

    clipkit keeps its feature cache beside the shards (``<dir>/_clipkit_cache``); a private copy
    lets the benchmark start the clipkit LiT run from a cold cache (cache building included, as
    the target says) without deleting a cache other runs use. A copy is rewritten when its source
    changed (size and mtime, recorded in ``<dest>/_sources.json``) or ``FLATTEN_VERSION`` did.
    """
    import json

    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / "_sources.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    out = []
    for p in paths:
        q = dest / Path(p).name
        st = Path(p).stat()
        stamp = [FLATTEN_VERSION, st.st_size, st.st_mtime_ns]
        if not q.exists() or manifest.get(q.name) != stamp:
            flatten_shard(p, q)
            manifest[q.name] = stamp
            manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            clear_feature_cache([str(q)])
        out.append(str(q))
    return out


def clear_feature_cache(shards: list[str]) -> None:
    import shutil

    for d in {Path(s).parent / "_clipkit_cache" for s in shards}:
        if d.exists():
            shutil.rmtree(d)


def locate_shards(args: argparse.Namespace) -> list[str]:
    if args.synthetic:
        return make_synthetic_shards(ROOT / ".cache" / "bench_synthetic", args.synthetic)
    pattern = args.shards or EMOJI_TRAIN_GLOB
    paths = sorted(glob.glob(str(ROOT / pattern) if not os.path.isabs(pattern) else pattern))
    if not paths and not args.shards and (ROOT / "data_tools" / "build_emoji.py").exists():
        print(
            "[bench] emoji shards missing; building them: python -m data_tools.build_emoji --out data/emoji",
            flush=True,
        )
        subprocess.run(
            [str(MAIN_ENV / "bin" / "python"), "-m", "data_tools.build_emoji", "--out", "data/emoji"],
            cwd=ROOT,
            check=True,
        )
        paths = sorted(glob.glob(str(ROOT / pattern)))
    if not paths:
        raise SystemExit(
            f"no shards match {pattern!r}; build the emoji shards "
            "(data_tools/build_emoji.py), pass --shards, or use --synthetic N"
        )
    return private_copy(paths, ROOT / args.out / "shards")


# ----------------------------------------------------------------------------- setups


def lit_settings() -> dict:
    """Model / optimizer / data settings of clipkit's LiT recipe (defaults when not written yet)."""
    sys.path.insert(0, str(ROOT))
    try:
        from clipkit.config import load_config

        if LIT_RECIPE.exists():
            cfg = load_config(LIT_RECIPE)
        else:  # recipe not written yet: clipkit defaults with the demo's locked image tower
            cfg = load_config(None, ["model.vision.locked=true"])
    except Exception as e:  # noqa: BLE001 -- clipkit is being written alongside; fall back to defaults
        print(f"[bench] could not read clipkit's LiT config ({e}); using built-in defaults", flush=True)
        return {}
    o = cfg.optim
    return {
        "batch_size": cfg.data.batch_size,
        "hp": Hparams(
            lr=o.lr,
            weight_decay=o.weight_decay,
            beta1=o.beta1,
            beta2=o.beta2,
            eps=o.eps,
            warmup_steps=o.warmup_steps,
            grad_clip=o.grad_clip,
            seed=cfg.train.seed,
            precision=cfg.train.precision,
        ),
        "embed_dim": cfg.model.embed_dim,
        "image_size": cfg.model.vision.image_size,
        "context_length": cfg.model.text.context_length,
        "lock_image": cfg.model.vision.locked,
        "lock_text": cfg.model.text.locked,
        "text_unlocked_layers": cfg.model.text.unlocked_layers,
        "text_lr_mult": cfg.model.text.lr_mult,
    }


def openclip_epoch_samples(n: int, batch_size: int, workers: int) -> int:
    """Samples open_clip_train trains per epoch for --train-num-samples n: whole batches, the
    same number per loader worker (open_clip_train/data.py get_wds_dataset, one process)."""
    return math.ceil(math.ceil(n / batch_size) / max(1, workers)) * max(1, workers) * batch_size


def build_setups(args: argparse.Namespace, shards: list[str]) -> list[Setup]:
    n_per_pass = sum(count_samples(s) for s in shards)
    if len(shards) < max(1, args.workers):
        raise SystemExit(
            f"{len(shards)} shards < {args.workers} workers (open_clip_train needs >= 1 per worker)"
        )
    out = []
    for name in args.setups.split(","):
        if name == "small":
            bs = args.batch_size or 64
            # Equal samples in both tools: clipkit's budget = what open_clip_train really trains.
            samples = openclip_epoch_samples(args.small_samples, bs, args.workers)
            out.append(
                Setup(
                    "small",
                    shards,
                    n_per_pass,
                    bs,
                    samples,
                    1,
                    Hparams(warmup_steps=args.small_warmup, precision=args.small_precision),
                    args.threads,
                    args.workers,
                    open_clip_model=args.small_model,
                    small_image_size=args.small_image_size,
                    small_context_length=args.small_context_length,
                    clipkit_overrides=list(args.clipkit_set),
                )
            )
        elif name == "lit":
            kw = lit_settings()
            recipe_bs = kw.pop("batch_size", 64)
            bs = args.batch_size or recipe_bs
            if args.lit_samples:
                epochs = 1
                samples = openclip_epoch_samples(args.lit_samples, bs, args.workers)
            else:  # an OpenCLIP "epoch" of n_per_pass samples, rounded up to whole batches per worker
                epochs = args.lit_epochs
                samples = epochs * openclip_epoch_samples(n_per_pass, bs, args.workers)
            out.append(
                Setup(
                    "lit",
                    shards,
                    n_per_pass,
                    bs,
                    samples,
                    epochs,
                    kw.pop("hp", Hparams()),
                    args.threads,
                    args.workers,
                    warm_cache=args.warm_cache,
                    **kw,
                )
            )
        else:
            raise SystemExit(f"unknown setup {name!r} (small, lit)")
    return out
