"""Run the usual torchvision image transforms on encoded bytes faster, with the same result.

``build_loader`` receives the vision tower's transform, usually a ``Compose`` of the shape

    [RGB conversion], geometry (RandomResizedCrop | Resize, CenterCrop, flips ...), ToTensor, [Normalize]

``plan_fast_image(transform)`` recognises that shape and returns a ``FastImage`` that does the
same work in two cheaper halves; any other transform gets ``None`` and runs as given.

* ``FastImage.load(bytes) -> (H, W, 3) uint8`` (per sample, in the loader worker):
  - ``RandomResizedCrop``: the crop box is drawn by torchvision's own ``get_params`` on the
    header-declared size, before any pixel is decoded: the same random calls, so the same
    distribution of crops. A JPEG is then decoded in the DCT domain at the largest 1/2, 1/4
    or 1/8 scale that keeps the *crop* at least the output size on both axes
    (``draft_jpeg``); the DCT reduction replaces the first, most expensive part of the
    antialiased downscale. The crop (its corners snapped to the reduced pixel grid: they move
    at most scale / 2 source pixels) is resized to the output by torch's vectorised uint8
    antialiased kernel, which uses PIL's filter coefficients: without a draft (PNG, WebP,
    small JPEGs) the pixels equal torchvision's to within rounding (mean < 0.05 levels of 255).
    Filters other than bilinear / bicubic go through PIL's ``resize`` with a box instead.
  - ``Resize`` first (eval: ``Resize`` + ``CenterCrop``): a draft to >= the resize output,
    then PIL's resize with a box that maps the reduced image exactly onto the source extent
    (a plain resize of a drafted odd-sized image is off by up to one source pixel:
    ceil(623 / 2) = 312 reduced pixels cover 624). Without a draft: torchvision's pixels.
  - any following PIL steps (CenterCrop, flips, ColorJitter ...) run as given.
* ``FastImage.collate(list of arrays) -> (B, 3, H, W) float`` (per batch, in the worker):
  ``ToTensor`` + ``Normalize`` as one 256-entry lookup table per channel, built with
  torchvision's own float ops, so the values are bit-identical to the per-sample tensors;
  in a loader worker the batch is written straight into shared memory.

Why it matters (one CPU core, 400-1000 px JPEGs to 224 px): torchvision's bicubic crop-resize
from the full-size image and the full JPEG decode are most of the per-sample cost; see
benchmarks/loader_throughput.py.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from clipkit.data.decode import decode_image, draft_jpeg, load_rgb, open_image

__all__ = ["FastImage", "draft_size_of", "plan_fast_image"]

# PIL -> PIL geometry / colour steps that keep an RGB image RGB; run as given after decoding.
_PIL_STEPS = {
    "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", "RandomVerticalFlip",
    "ColorJitter", "Pad", "RandomResizedCrop",
}  # fmt: skip
# Filters that low-pass when they downscale: a DCT-domain downscale before them is equivalent.
_SMOOTH_FILTERS = {Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS,
                   Image.Resampling.BOX, Image.Resampling.HAMMING}  # fmt: skip
_TORCH_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


def _is_rgb_conversion(step: Any) -> bool:
    """clipkit's ``convert_to_rgb``, open_clip's ``_convert_to_rgb`` / ``MaybeConvertMode("RGB")``.

    Decoded images are RGB already (transparency composited on white), so these are no-ops.
    """
    name = getattr(step, "__name__", type(step).__name__)
    if name in ("convert_to_rgb", "_convert_to_rgb"):
        return True
    return type(step).__name__ == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB"


def _is_torchvision(step: Any, names: set[str] | tuple[str, ...]) -> bool:
    cls = type(step)
    return cls.__module__.startswith("torchvision.transforms") and cls.__name__ in names


def _pil_filter(mode: Any) -> int:
    from torchvision.transforms import functional as F

    return int(F.pil_modes_mapping[mode])


def _lookup_table(mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """(3, 256) float: ToTensor's ``x / 255`` then Normalize's ``(x - mean) / std``, same ops."""
    values = torch.arange(256, dtype=torch.uint8).expand(3, 256).to(torch.get_default_dtype()).div(255)
    if mean is not None and std is not None:
        dtype = values.dtype
        values = values.sub(torch.as_tensor(mean, dtype=dtype).view(-1, 1))
        values = values.div(torch.as_tensor(std, dtype=dtype).view(-1, 1))
    return values.expand(3, 256).contiguous().numpy()


def empty_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a loader worker it lives in shared memory, as torch's
    default_collate does it, so sending the batch to the main process copies nothing.

    Otherwise numpy allocates it: glibc reuses a freed 38 MB block where torch's allocator
    maps fresh pages for every batch (measured: ~0.5 ms more per 224 px image in page faults).
    """
    template = torch.empty(0, dtype=dtype)
    if get_worker_info() is None:
        return torch.from_numpy(np.empty(shape, dtype=template.numpy().dtype))
    storage = template._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return template.new(storage).resize_(shape)


def _resize_uint8(image: np.ndarray, out_h: int, out_w: int, mode: str) -> np.ndarray:
    """(h, w, 3) uint8 -> (out_h, out_w, 3) uint8 with torch's antialiased uint8 kernel.

    Its coefficients follow PIL's (bicubic a = -0.5, support scaled by the reduction), so the
    result matches PIL's ``resize`` to within rounding, several times faster (vectorised).
    """
    with warnings.catch_warnings():  # a read-only view of PIL's bytes: torch only reads it
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels-last memory
    y = torch.nn.functional.interpolate(x, size=(out_h, out_w), mode=mode, antialias=True)
    return y[0].permute(1, 2, 0).numpy()  # (out_h, out_w, 3)


def resized_size(height: int, width: int, size: int | Sequence[int], max_size: int | None) -> tuple[int, int]:
    """(h, w) that torchvision's ``Resize(size, max_size=...)`` gives an image of (height, width)."""
    if isinstance(size, Sequence) and len(size) == 2:
        return int(size[0]), int(size[1])
    target = int(size if isinstance(size, int) else size[0])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = target, int(target * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


class FastImage:
    """Encoded bytes -> uint8 arrays (per sample) -> normalised batch (see module docstring)."""

    def __init__(
        self,
        steps: list[Callable[[Image.Image], Image.Image]],
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        max_pixels: int | None = None,
    ):
        first = steps[0] if steps else None
        # The first step, when it is the one resize of the chain, is done with a JPEG draft.
        self.first = first if _is_torchvision(first, ("RandomResizedCrop", "Resize")) else None
        self.steps = steps[1:] if self.first is not None else steps  # run as given after it
        self.filter = _pil_filter(self.first.interpolation) if self.first is not None else None
        # A random crop with a bilinear / bicubic filter is resized by torch's vectorised uint8
        # antialiased kernel (PIL's filter, a few times faster); other cases by PIL itself.
        self.torch_mode = None
        if _is_torchvision(first, ("RandomResizedCrop",)):
            self.torch_mode = _TORCH_MODES.get(self.filter)
        self.lut = _lookup_table(mean, std)  # (3, 256)
        self.max_pixels = max_pixels

    def _geometry(self, img: Image.Image) -> tuple[int, int, int, int, int, int]:
        """(top, left, h, w) of the source region in full-size pixels, and the (out_h, out_w)."""
        width, height = img.size
        step = self.first
        if type(step).__name__ == "RandomResizedCrop":
            # Torchvision's own draw on the full-size geometry: same RNG calls, same distribution.
            top, left, h, w = step.get_params(img, step.scale, step.ratio)
            out_h, out_w = (int(v) for v in step.size)
            return top, left, h, w, out_h, out_w
        out_h, out_w = resized_size(height, width, step.size, step.max_size)
        return 0, 0, height, width, out_h, out_w

    def _first_step(self, data: bytes | None) -> Image.Image | np.ndarray:
        """Decode + the first resize: a PIL image, or (H, W, 3) uint8 from the torch kernel."""
        img = open_image(data, self.max_pixels)  # header only
        width, height = img.size
        top, left, h, w, out_h, out_w = self._geometry(img)
        scale = 1
        if self.filter in _SMOOTH_FILTERS:
            # The most reduced image whose crop is still >= the output on both axes.
            scale = draft_jpeg(img, math.ceil(out_w * width / w), math.ceil(out_h * height / h))
        img = load_rgb(img)
        if self.torch_mode is not None:
            # Reduced pixel x covers original [x * scale, (x + 1) * scale): the crop's corners
            # snap to that grid (they move <= scale / 2 original pixels; none when scale == 1).
            x0, y0 = round(left / scale), round(top / scale)
            x1 = min(max(x0 + 1, round((left + w) / scale)), img.width)
            y1 = min(max(y0 + 1, round((top + h) / scale)), img.height)
            return _resize_uint8(np.asarray(img)[y0:y1, x0:x1], out_h, out_w, self.torch_mode)
        if scale == 1:  # exactly what torchvision does to a PIL image
            if (top, left, h, w) != (0, 0, height, width):
                img = img.crop((left, top, left + w, top + h))
            return img.resize((out_w, out_h), self.filter)
        # Continuous coordinates: the box maps the reduced image exactly onto the original.
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        return img.resize((out_w, out_h), self.filter, box=box)

    def load(self, data: bytes | None) -> np.ndarray:
        """Encoded image -> (H, W, 3) uint8 after the geometry; raises ``SampleError`` on bad data."""
        if self.first is None:
            img: Image.Image | np.ndarray = decode_image(data, max_pixels=self.max_pixels)
        else:
            img = self._first_step(data)
        if self.steps and isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        for step in self.steps:
            img = step(img)
        if isinstance(img, np.ndarray):
            return img
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            raise TypeError(f"transform step returned {type(img).__name__} {getattr(img, 'mode', '')}")
        return np.asarray(img)

    def collate(self, images: list[np.ndarray]) -> torch.Tensor:
        """list of B (H, W, 3) uint8 -> (B, 3, H, W) float, as ToTensor + Normalize would give."""
        h, w, _ = images[0].shape
        batch = empty_batch((len(images), 3, h, w), torch.get_default_dtype())
        out = batch.numpy()
        for k, img in enumerate(images):
            if img.shape != (h, w, 3):
                raise ValueError(f"images of one batch differ in size: {img.shape} vs {(h, w, 3)}")
            for c in range(3):
                np.take(self.lut[c], img[:, :, c], out=out[k, c])  # (H, W) gather, no float math
        return batch


def draft_size_of(transform: Any) -> int | None:
    """The size of the first ``Resize`` of a composed transform, for JPEG draft decoding.

    None when unknown or when the transform crops at random (a random crop of a drafted image
    would be upscaled, losing detail). A transform may state it as ``transform.draft_size``.
    """
    explicit = getattr(transform, "draft_size", None)
    if explicit is not None:
        return int(explicit)
    steps = getattr(transform, "transforms", None)
    if not steps or any("Random" in type(t).__name__ and "Crop" in type(t).__name__ for t in steps):
        return None
    for t in steps:
        if type(t).__name__ == "Resize":
            size = t.size
            return int(size) if isinstance(size, int) else int(max(size))
    return None


def plan_fast_image(transform: Any, max_pixels: int | None = None) -> FastImage | None:
    """A ``FastImage`` doing ``transform``'s work, or None when its shape is not recognised.

    A transform may opt out with an attribute ``fast_path = False``.
    """
    if getattr(transform, "fast_path", True) is False:
        return None
    steps = list(getattr(transform, "transforms", None) or [])
    if not steps:
        return None
    steps = [s for s in steps if not _is_rgb_conversion(s)]
    mean = std = None
    if steps and _is_torchvision(steps[-1], ("Normalize",)):
        mean, std = steps[-1].mean, steps[-1].std
        steps = steps[:-1]
    is_to_tensor = steps and (
        _is_torchvision(steps[-1], ("ToTensor",)) or type(steps[-1]).__name__ == "MaybeToTensor"
    )
    if not is_to_tensor:
        return None
    steps = steps[:-1]
    if not all(_is_torchvision(s, _PIL_STEPS) for s in steps):
        return None
    if any(_is_torchvision(s, ("RandomResizedCrop",)) for s in steps[1:]):
        return None  # a random crop after other steps: keep the plain path
    return FastImage(steps, mean, std, max_pixels)
