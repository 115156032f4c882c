"""Embedding images and texts with a dual encoder: device, eval mode, batching, cached tower features.

The model is used only through the DualEncoder contract (ARCHITECTURE.md):
``image_transform(train=False)``, ``tokenize(list[str])``, ``encode_image(image=...)``
and ``encode_text(tokens)``. Embeddings are taken unnormalised and L2-normalised
here with ``F.normalize``, as CLIP_benchmark does with open_clip models. Evaluation,
indexing, data filtering and the demo all embed through this module.

Speed without changing a number: a torchvision ``Compose`` that ends in ``ToTensor`` (+
``Normalize``) is split; loader workers run the PIL steps and hand over uint8 tensors, and
the float conversion and normalisation run once per batch, with the same element-wise
operations (bit-identical). Everything runs under ``torch.inference_mode``. Without loader
workers, a background thread reads, decodes and transforms the next batches while the model
runs on the current one (PIL and torch release the GIL): the same batches in the same order.

``image_inference`` lays a convolutional image side out channels-last for the pass (oneDNN's
fast convolutions; the same fp32 arithmetic up to summation order, ~1e-6 relative) and, only
when asked and only where the CPU or GPU does bf16 natively (``bf16_support``), autocasts to bf16.

A locked image tower (LiT) gives the same outputs for every state of a run: ``tower_features``
runs it once over a dataset and ``ProjectedModel`` presents any state of the model with those
(F,) features standing in for images.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipkit.errors import ClipkitError
from clipkit.models.inference import PRECISIONS, bulk_inference, convolutional

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 matmul on x86


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run in eval mode and inference mode; restore the train/eval state after."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train(True)


def encode_images(model: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D) L2-normalised image embeddings."""
    return F.normalize(model.encode_image(image=images.to(device), normalize=False), dim=-1)


def encode_texts(model: Any, texts: list[str], device: torch.device) -> torch.Tensor:
    """list of B strings -> (B, D) L2-normalised text embeddings."""
    return F.normalize(model.encode_text(model.tokenize(texts).to(device), normalize=False), dim=-1)


# ----------------------------------------------------------------------------- transforms


class _ToUint8:
    """PIL RGB -> (3, H, W) uint8 tensor: ``ToTensor`` without its ``.float().div(255)``."""

    def __call__(self, pic: Any) -> torch.Tensor:
        if getattr(pic, "mode", None) != "RGB":
            raise TypeError(
                f"the image transform's PIL steps left a {getattr(pic, 'mode', type(pic).__name__)} image; "
                "evaluation expects them to end in an RGB PIL image before ToTensor"
            )
        arr = np.array(pic, dtype=np.uint8, copy=True)  # (H, W, 3)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class _PilThenUint8:
    def __init__(self, steps: list[Callable[[Any], Any]]):
        self.steps, self.to_uint8 = steps, _ToUint8()

    def __call__(self, image: Any) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return self.to_uint8(image)


class _BatchNormalize:
    """uint8 (B, 3, H, W) -> float, with ToTensor's ``div(255)`` and Normalize's ``sub_(mean).div_(std)``."""

    def __init__(self, normalizers: list[Any]):
        self.stats = [
            (torch.as_tensor(n.mean, dtype=torch.float32), torch.as_tensor(n.std, dtype=torch.float32))
            for n in normalizers
        ]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(dtype=torch.get_default_dtype()).div(255)
        for mean, std in self.stats:
            x = x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
        return x


def split_transform(transform: Any) -> tuple[Callable[[Any], torch.Tensor], Callable | None]:
    """(per-sample part, per-batch part or None) of an image transform; see module docstring.

    Split only ``Compose([<PIL steps>, ToTensor, Normalize*])`` whose Normalize steps are
    not in-place; anything else runs whole, per sample.
    """
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps:
        return transform, None
    cut = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
    if cut is None:
        return transform, None
    tail = steps[cut + 1 :]
    if not all(type(s) is T.Normalize and not s.inplace for s in tail):
        return transform, None
    return _PilThenUint8(list(steps[:cut])), _BatchNormalize(tail)


class _Transformed(torch.utils.data.IterableDataset):
    def __init__(self, samples: Iterable[dict[str, Any]], transform: Callable[[Any], torch.Tensor]):
        self.samples = samples
        self.transform = transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample in self.samples:
            yield {**sample, "image": self.transform(sample["image"])}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "key": [s["key"] for s in samples],
        "order": [s.get("order") for s in samples],
    }
    if "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)  # (B,)
    if "captions" in samples[0]:
        batch["captions"] = [list(s["captions"]) for s in samples]
    return batch


def _put(q: queue.Queue, item: tuple[str, Any], stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has gone (``stop``); False then."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetched(batches: Iterable[Any], depth: int) -> Iterator[Any]:
    """``batches`` in their order, produced ``depth`` ahead by a background thread; its errors
    are raised here, and closing this generator early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                if not _put(q, ("batch", batch), stop):
                    return
            _put(q, ("end", None), stop)
        except BaseException as err:  # noqa: BLE001 -- not swallowed: the consumer raises it
            _put(q, ("error", err), stop)

    thread = threading.Thread(target=produce, name="clipkit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def image_batches(
    model: Any,
    dataset: Iterable[dict[str, Any]],
    batch_size: int,
    num_workers: int = 0,
    prefetch: int = 2,
) -> Iterator[dict[str, Any]]:
    """Batches ``{"image" (B,3,H,W), "key", "order", "label"? (B,), "captions"?}`` of samples
    ``{"image": PIL, "key", "order"?, "label"?, "captions"?}``, in the model's eval transform.

    With ``num_workers`` > 0, batches come from the workers in turn (not file order);
    ``"order"`` gives each sample's reading position. With none, a thread prepares up to
    ``prefetch`` batches ahead (0: none), in reading order.
    """
    per_sample, per_batch = split_transform(model.image_transform(train=False))
    loader = torch.utils.data.DataLoader(
        _Transformed(dataset, per_sample),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    batches = prefetched(loader, prefetch) if num_workers == 0 and prefetch > 0 else loader
    for batch in batches:
        if per_batch is not None:
            batch["image"] = per_batch(batch["image"])
        yield batch


# ----------------------------------------------------------------------------- layout, precision


def image_module(model: Any) -> nn.Module | None:
    """The modules that turn an image into its embedding (``EvalModel.image_side``, a
    DualEncoder's ``vision``), or None when the model does not name them."""
    side = getattr(model, "image_side", None)
    if callable(side):
        try:
            return side()
        except (ClipkitError, NotImplementedError):  # a factory model that is not an nn.Module
            return None
    vision = getattr(model, "vision", None)
    return vision if isinstance(vision, nn.Module) else None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (first ``flags`` line of /proc/cpuinfo); empty where unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            return set(value.split())
    return set()


def bf16_support(device: str | torch.device = "cpu", flags: set[str] | None = None) -> str | None:
    """Why ``device`` runs bf16 natively (e.g. ``"CPU flags avx512_bf16"``), or None when it
    would only emulate it (slower than fp32). Detected, never assumed."""
    device = torch.device(device)
    if device.type == "cuda":
        return "GPU bf16" if torch.cuda.is_bf16_supported() else None
    have = [f for f in BF16_FLAGS if f in (cpu_flags() if flags is None else flags)]
    return f"CPU flags {', '.join(have)}" if have else None


def check_precision(precision: str, device: str | torch.device = "cpu") -> None:
    """Raise unless ``precision`` is known and, for bf16, native on ``device``."""
    if precision not in PRECISIONS:
        raise ClipkitError(
            f"unknown inference precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if precision == "bf16" and bf16_support(device) is None:
        raise ClipkitError(
            f"bf16 asked for, but {device} has no native bf16 ({' / '.join(BF16_FLAGS)} on a CPU): it would "
            "be emulated and slower than fp32. Run with --precision fp32"
        )


@contextmanager
def image_inference(model: Any, precision: str = "fp32") -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Within the block, ``prep(images)`` lays a (B, 3, H, W) batch out for the model's image side:
    channels-last for a convolutional one (``clipkit.models.inference.bulk_inference``), as is
    otherwise. ``precision="bf16"`` autocasts the block (text encoded in it too)."""
    if precision not in PRECISIONS:
        raise ValueError(f"inference precision must be one of {PRECISIONS}, got {precision!r}")
    module = image_module(model)
    if module is not None and convolutional(module):
        with bulk_inference(module, precision) as prep:
            yield prep
        return
    device = model_device(model)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield _identity


# ----------------------------------------------------------------------------- pairs


class SimilarityScorer:
    """Cosine similarity of image and caption embeddings under a DualEncoder-like model
    (``clipkit data filter`` passes one to ``clipkit.data.filters`` as its scorer)."""

    def __init__(self, model: Any, batch_size: int = 64, device: str | None = None):
        self.model, self.batch_size = model, batch_size
        self.device = torch.device(device) if device else model_device(model)
        self.transform = model.image_transform(train=False)

    def __call__(self, images: list[Any], texts: list[str]) -> np.ndarray:
        """(B,) similarities of B (PIL image, caption) pairs."""
        x = torch.stack([self.transform(im) for im in images])  # (B, 3, H, W)
        with eval_mode(self.model):
            img = encode_images(self.model, x, self.device)  # (B, D), L2-normalised
            txt = encode_texts(self.model, texts, self.device)  # (B, D), L2-normalised
        return (img * txt).sum(-1).float().cpu().numpy()


# ----------------------------------------------------------------------------- locked tower


class _TowerView(nn.Module):
    """The model seen through its vision tower only (for ``image_batches``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def image_transform(self, train: bool = False) -> Any:
        return self.model.image_transform(False)


def tower_features(
    model: nn.Module, dataset: Iterable[dict[str, Any]], batch_size: int = 64, precision: str = "fp32"
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """(batch, (B, F) float32 CPU features) of a DualEncoder's vision tower over ``dataset``.

    The tower runs channels-last (and under bf16 autocast with ``precision="bf16"``), as the
    training feature cache does (``clipkit.models.inference``).
    """
    device = model_device(model)
    with eval_mode(model), bulk_inference(model.vision, precision) as prep:
        for batch in image_batches(_TowerView(model), dataset, batch_size, 0):
            yield batch, model.tower_features(prep(batch["image"].to(device))).float().cpu()


class ProjectedModel(nn.Module):
    """A DualEncoder whose ``encode_image`` takes cached tower features instead of pixels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def image_transform(self, train: bool = False) -> Any:
        return _identity

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(image_features=image, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(text, normalize=normalize)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.model.tokenize(texts)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
