"""Embedding a dataset with a dual encoder: batching, device, eval mode, ranks, order.

The model is used only through the DualEncoder contract (ARCHITECTURE.md):
``image_transform(train=False)``, ``tokenize(list[str])``, ``encode_image(image=...)``
and ``encode_text(tokens)``. Embeddings are taken unnormalised and L2-normalised
here with ``F.normalize``, as CLIP_benchmark does with open_clip models.

Speed without changing a number: a torchvision ``Compose`` that ends in ``ToTensor`` (+
``Normalize``) is split; loader workers run the PIL steps and hand over uint8 tensors, and
the float conversion and normalisation run once per batch, with the same element-wise
operations (bit-identical). Everything runs under ``torch.inference_mode``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipkit.evaluation.distributed import Ranks, all_gather
from clipkit.evaluation.source import EvalDataError


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


def image_batches(
    model: Any, dataset: Iterable[dict[str, Any]], batch_size: int, num_workers: int = 0
) -> Iterator[dict[str, Any]]:
    """Batches ``{"image" (B,3,H,W), "key", "order", "label"? (B,), "captions"?}``.

    With ``num_workers`` > 0, batches come from the workers in turn (not file order);
    ``"order"`` gives each sample's reading position.
    """
    per_sample, per_batch = split_transform(model.image_transform(train=False))
    loader = torch.utils.data.DataLoader(
        _Transformed(dataset, per_sample),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    for batch in loader:
        if per_batch is not None:
            batch["image"] = per_batch(batch["image"])
        yield batch


def encode_images(model: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D) L2-normalised image embeddings."""
    return F.normalize(model.encode_image(image=images.to(device), normalize=False), dim=-1)


def encode_texts(model: Any, texts: list[str], device: torch.device) -> torch.Tensor:
    """list of B strings -> (B, D) L2-normalised text embeddings."""
    return F.normalize(model.encode_text(model.tokenize(texts).to(device), normalize=False), dim=-1)


# ----------------------------------------------------------------------------- whole datasets


@dataclass
class Embedded:
    """A dataset's embeddings in reading order (the order of a single process without workers)."""

    image_emb: torch.Tensor  # (N, D) float32, L2-normalised
    keys: list[str]
    labels: torch.Tensor | None = None  # (N,) classification
    text_emb: torch.Tensor | None = None  # (Nt, D) retrieval: every caption, image by image
    text_to_image: torch.Tensor | None = None  # (Nt,) index of each caption's image


def _rank_part(
    model: Any, dataset: Iterable[dict[str, Any]], batch_size: int, num_workers: int, texts: bool
) -> dict[str, Any]:
    device = model_device(model)
    part: dict[str, Any] = {"order": [], "keys": [], "labels": [], "images": [], "texts": [], "counts": []}
    with eval_mode(model):
        for batch in image_batches(model, dataset, batch_size, num_workers):
            start = len(part["order"])
            part["order"] += [o if o is not None else (0, start + i) for i, o in enumerate(batch["order"])]
            part["keys"] += batch["key"]
            part["images"].append(encode_images(model, batch["image"], device).float().cpu())
            if "label" in batch:
                part["labels"].append(batch["label"])
            if texts:
                captions = [c for caps in batch["captions"] for c in caps]
                if captions:
                    part["texts"].append(encode_texts(model, captions, device).float().cpu())
                part["counts"] += [len(caps) for caps in batch["captions"]]
    return part


def _merge(parts: list[dict[str, Any]], texts: bool) -> Embedded:
    rows, labels, keys, counts, text_rows, order = [], [], [], [], [], []
    for part in parts:
        if not part["order"]:
            continue
        rows.append(torch.cat(part["images"]))
        keys += part["keys"]
        order += part["order"]
        if part["labels"]:
            labels.append(torch.cat(part["labels"]))
        if texts:
            counts += part["counts"]
            text_rows.append(torch.cat(part["texts"]) if part["texts"] else torch.zeros(0, rows[-1].shape[1]))
    if not rows:
        raise EvalDataError("yielded no samples")
    image_emb = torch.cat(rows)
    perm = sorted(range(len(order)), key=order.__getitem__)  # reading order
    out = Embedded(image_emb=image_emb[perm], keys=[keys[i] for i in perm])
    if labels:
        out.labels = torch.cat(labels)[perm]
    if texts:
        text_emb = torch.cat(text_rows)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
        idx = [s + t for i in perm for s in [starts[i]] for t in range(counts[i])]
        out.text_emb = text_emb[idx] if idx else text_emb[:0]
        out.text_to_image = torch.tensor(
            [new for new, i in enumerate(perm) for _ in range(counts[i])], dtype=torch.long
        )
    return out


def embed_dataset(
    model: Any,
    dataset: Iterable[dict[str, Any]],
    batch_size: int = 64,
    num_workers: int = 0,
    ranks: Ranks | None = None,
    texts: bool = False,
) -> Embedded:
    """Embed every image (and, with ``texts``, every caption) of ``dataset``.

    With ``ranks.world`` > 1 each rank embeds its share (``dataset.shard``) and all ranks
    receive the gathered result. Raises ``EvalDataError`` naming ``dataset`` when it is empty.
    """
    ranks = ranks or Ranks()
    source = dataset
    if ranks.world > 1:
        if not hasattr(dataset, "shard"):
            raise TypeError(f"{dataset!r} cannot be split across ranks (it has no .shard(rank, world))")
        source = dataset.shard(ranks.rank, ranks.world)
    part = _rank_part(model, source, batch_size, num_workers, texts)
    try:
        return _merge(all_gather(part, ranks), texts)
    except EvalDataError:
        raise EvalDataError(f"{dataset!r} yielded no samples: the dataset is empty") from None
