"""Image augmentation for training, and the augmented views of the feature cache.

``augmented_transform(size, mean, std, cfg)`` is a vision tower's training transform when
``model.vision.augment=true``, built from ``model.vision.augmentation`` (``AugmentConfig``), in
this order (a step whose setting is 0 is left out)::

    RGB -> RandomResizedCrop(scale, ratio) -> horizontal flip -> silhouette -> colour jitter
        -> grayscale -> invert -> Gaussian blur -> ToTensor -> Normalize

With the defaults only the crop is there: ``RandomResizedCrop(scale=(0.9, 1))``, open_clip's
train-time crop (the usual torchvision shape, which ``fast_transform`` runs faster). Every
random draw comes from torch's default generator, so a sample's augmentation is fixed by how
that generator is seeded: per (seed, epoch, sample) in the training loader
(``clipkit.data.prepare``), per (view seed, key, view) in the feature cache.

The steps for out-of-domain transfer of an ImageNet tower to drawings, clip-art and silhouettes:
``silhouette`` (the shape alone, white on black: pixels unlike the colour of the image's border
become white), ``invert`` (white-on-black <-> black-on-white), ``blur`` (soft edges, low
resolution), with ``grayscale`` and colour jitter (colour carries little across those domains).

Cached views (``train.cache_views=K``; ``clipkit.training.feature_cache``): ``ViewStack`` turns
one image and its key into (K, 3, H, W): view 0 the deterministic eval transform, view v >= 1
the augmented transform under torch's generator seeded by ``view_seed(seed, key, v)``.
Training draws one view per sample with ``draw_view`` from (seed, epoch, key) and, resampled,
the sample's draw; evaluation reads view 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipkit.config import AugmentConfig

# Bumped when a step's code changes what it computes: part of the views' cache fingerprint.
AUGMENT_VERSION = 1
# A pixel belongs to the silhouette when a channel differs from the border's colour by more.
SILHOUETTE_THRESHOLD = 32


def convert_to_rgb(image: Any) -> Any:
    """PIL image -> RGB (a module-level function so transforms pickle into loader workers)."""
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


class Silhouette:
    """With probability ``p``: the image's shape white on black. The background is the median
    colour of the border pixels; a pixel whose channels all lie within ``SILHOUETTE_THRESHOLD``
    of it is background (black), any other pixel is shape (white)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return img
        x = np.asarray(img.convert("RGB"), dtype=np.int16)  # (H, W, 3)
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])  # (2H + 2W, 3)
        background = np.median(border, axis=0)  # (3,)
        shape = (np.abs(x - background) > SILHOUETTE_THRESHOLD).any(axis=-1)  # (H, W)
        return Image.fromarray(np.where(shape, 255, 0).astype(np.uint8)).convert("RGB")

    def __repr__(self) -> str:
        return f"Silhouette(p={self.p})"


def augmented_transform(
    size: int | tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    cfg: AugmentConfig,
    interpolation: Any = None,
) -> Any:
    """PIL -> (3, H, W) float tensor: the steps of ``cfg`` (module docstring), then normalize.

    ``interpolation``: torchvision's ``InterpolationMode`` of the crop's resize (bicubic default).
    """
    from torchvision import transforms as T

    interp = T.InterpolationMode.BICUBIC if interpolation is None else interpolation
    steps: list[Any] = [
        convert_to_rgb,
        T.RandomResizedCrop(size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), interpolation=interp),
    ]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip(cfg.hflip))
    if cfg.silhouette:
        steps.append(Silhouette(cfg.silhouette))
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        steps.append(T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    if cfg.grayscale:
        steps.append(T.RandomGrayscale(cfg.grayscale))
    if cfg.invert:
        steps.append(T.RandomInvert(cfg.invert))
    if cfg.blur:
        side = size if isinstance(size, int) else max(size)
        kernel = 2 * max(1, round(3 * cfg.blur_sigma[1])) + 1  # +-3 sigma of the widest blur
        kernel = min(kernel, side - 1 if side % 2 == 0 else side)  # odd, no wider than the image
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=tuple(cfg.blur_sigma))], p=cfg.blur))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


# ---------------------------------------------------------------------------- cached views


def views_fingerprint(cfg: AugmentConfig, views: int) -> str:
    """Folder suffix of a cache of ``views`` views augmented per ``cfg`` (its seed included)."""
    settings = {
        k: [float(x) for x in v] if isinstance(v, list) else v for k, v in dataclasses.asdict(cfg).items()
    }
    blob = json.dumps({"settings": settings, "views": views, "version": AUGMENT_VERSION}, sort_keys=True)
    return f"views{views}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def view_seed(seed: int, key: str, view: int) -> int:
    """torch seed of view ``view`` of the sample ``key`` (stable across processes and runs)."""
    digest = hashlib.sha256(f"{seed}:{key}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """torch's default (CPU) generator seeded with ``seed`` inside the block, put back after."""
    gen = torch.default_generator  # (torch.manual_seed would also seed every GPU: much slower)
    saved = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(saved)


class ViewStack:
    """``(PIL image, key) -> (views, 3, H, W)``: view 0 ``eval_transform(img)``, view v >= 1
    ``train_transform(img)`` under torch's generator seeded by ``view_seed(seed, key, v)``.

    The loader passes the sample key to a transform with ``wants_key`` (``clipkit.data.prepare``).
    """

    wants_key = True
    fast_path = False  # per-sample PIL path: the views share one decoded image

    def __init__(
        self,
        eval_transform: Callable[[Image.Image], torch.Tensor],
        train_transform: Callable[[Image.Image], torch.Tensor],
        views: int,
        seed: int = 0,
    ):
        if views < 2:
            raise ValueError(f"a ViewStack holds at least 2 views, got {views}")
        self.eval_transform, self.train_transform = eval_transform, train_transform
        self.views, self.seed = views, seed

    def __call__(self, img: Image.Image, key: str) -> torch.Tensor:
        out = [self.eval_transform(img)]
        for v in range(1, self.views):
            with seeded_torch(view_seed(self.seed, key, v)):
                out.append(self.train_transform(img))
        return torch.stack(out)  # (views, 3, H, W)


def draw_view(seed: int, epoch: int, key: str, draw: Any, views: int) -> int:
    """The cached view a training step reads for sample ``key``: uniform over ``range(views)``,
    from (seed, epoch, key) and, resampled, the sample's ``draw`` (a repeat draws anew)."""
    tail = f":{draw}" if draw is not None else ""
    return random.Random(f"{seed}:{epoch}:{key}:view{tail}").randrange(views)
