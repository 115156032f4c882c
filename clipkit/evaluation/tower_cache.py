"""One image pass per (locked image tower, dataset), shared by every model that has that tower.

LiT runs lock the image tower: every run of a sweep, and every checkpoint of a run, computes
the same tower outputs on an evaluation set, and only the projection head after them differs.
With a cache folder, the suite runner stores those (N, F) outputs on disk, keyed by the
tower's weights (``Tower.fingerprint``), the eval transform and the dataset
(``EvalSource.fingerprint``: paths, sizes, mtimes, options), and every later model with that
tower reads them and runs only its head (``clipkit.models.embed.ProjectedModel``).

The features are taken exactly as an uncached evaluation computes them (same batches, same
transform, ``model.tower_features``, fp32, the memory layout of ``image_inference``), so the
scores are bit-identical with and without the cache (``tests/test_eval_tower_cache.py``). A model whose
image tower is not locked (or has unlocked top layers) is evaluated as usual: its tower is its
own, and a cache would be written once and never read.

Layout: ``<cache_dir>/tower/<key>.pt``, written atomically (``clipkit.data.atomic``), so a
killed evaluation leaves the old file or none. A file that cannot be read is recomputed. While a
process computes a key it holds a lock on ``<key>.lock``: another process that wants the same
features waits and reads them instead of computing them too.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from clipkit.evaluation.cached import FeatureDataset
from clipkit.models.adapters import transform_signature
from clipkit.models.embed import ProjectedModel, eval_mode, image_batches, image_inference, model_device

FORMAT = 2  # 2: features taken under image_inference (channels-last for a convolutional tower)


def locked_dual_encoder(model: Any) -> Any | None:
    """The DualEncoder inside an evaluation adapter when its image tower is fully locked, else None."""
    inner = getattr(model, "model", None)
    vision = getattr(inner, "vision", None)
    if vision is None or not callable(getattr(inner, "tower_features", None)):
        return None
    if not getattr(vision, "locked", False) or getattr(vision, "unlocked_layers", 0):
        return None
    if any(p.requires_grad for p in vision.parameters()) or not callable(
        getattr(vision, "fingerprint", None)
    ):
        return None
    return inner


def cache_key(model: Any, inner: Any, dataset: Any, batch_size: int) -> str:
    """sha256 (24 hex) of everything that determines the features."""
    text = "|".join(
        [
            f"v{FORMAT}",
            inner.vision.fingerprint(),
            transform_signature(model.image_transform(False)),
            dataset.fingerprint(),
            f"bs={batch_size}",  # conv kernels may round differently with another batch shape
            str(torch.get_default_dtype()),
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _compute(model: Any, inner: Any, dataset: Any, batch_size: int, num_workers: int) -> dict[str, Any]:
    from clipkit.evaluation.embed import image_rows

    device = model_device(inner)
    feats, keys, labels, captions = [], [], [], []
    with eval_mode(inner), image_inference(model) as prep:
        batches = image_batches(model, dataset, batch_size, num_workers)

        def encode(images: torch.Tensor) -> torch.Tensor:  # (B, F); CPU lanes for a CNN tower
            return inner.tower_features(prep(images).to(device)).float().cpu()

        for batch, rows in image_rows(inner.vision, batches, encode, device):
            feats.append(rows)
            order = [o if o is not None else (0, len(keys) + i) for i, o in enumerate(batch["order"])]
            keys += [(o, k) for o, k in zip(order, batch["key"], strict=True)]
            if "label" in batch:
                labels.append(batch["label"])
            if "captions" in batch:
                captions += batch["captions"]
    if not feats:
        return {"features": torch.zeros(0), "keys": [], "labels": None, "captions": None}
    perm = sorted(range(len(keys)), key=lambda i: keys[i][0])  # reading order, as embed_dataset
    return {
        "format": FORMAT,
        "features": torch.cat(feats)[perm].contiguous(),
        "keys": [keys[i][1] for i in perm],
        "labels": torch.cat(labels)[perm] if labels else None,
        "captions": [captions[i] for i in perm] if captions else None,
    }


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError):  # torn or foreign
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return data


@contextlib.contextmanager
def _computing(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (``clipkit.data.atomic.file_lock``) while this process computes
    ``path``: the runs of a sweep that start together (``--parallel``) then make one image pass,
    not one each; the others say whom they wait for, wait, and read its file. The kernel drops
    the lock of a killed process."""
    from clipkit.data.atomic import file_lock

    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(
        path.with_suffix(".lock"), "evaluation", f"computing the image-tower features {path.name}",
        wait=True, on_wait=lambda msg: print(msg, flush=True),
    ):  # fmt: skip
        yield


def _save(path: Path, data: dict[str, Any]) -> None:
    from clipkit.data.atomic import atomic_open

    with atomic_open(path) as f:
        torch.save(data, f)


def as_feature_dataset(data: dict[str, Any], source: Any) -> FeatureDataset:
    samples = []
    for i, key in enumerate(data["keys"]):
        sample: dict[str, Any] = {"image": data["features"][i], "key": key, "order": (0, i)}
        if data["labels"] is not None:
            sample["label"] = int(data["labels"][i])
        if data["captions"] is not None:
            sample["captions"] = data["captions"][i]
        samples.append(sample)
    return FeatureDataset(samples, source)


def cached_view(
    model: Any, dataset: Any, cache_dir: Path | None, batch_size: int, num_workers: int = 0
) -> tuple[Any, Any, str]:
    """(model, dataset, "hit"|"miss"|"off") to evaluate: the originals, or a ``ProjectedModel`` and
    a ``FeatureDataset`` of stored tower outputs when the model's image tower is locked."""
    inner = locked_dual_encoder(model)
    if cache_dir is None or inner is None or not callable(getattr(dataset, "fingerprint", None)):
        return model, dataset, "off"
    path = Path(cache_dir) / "tower" / f"{cache_key(model, inner, dataset, batch_size)}.pt"
    data, state = _load(path), "hit"
    if data is None:
        with _computing(path):
            data = _load(path)  # written by another process while this one waited
            if data is None:
                data, state = _compute(model, inner, dataset, batch_size, num_workers), "miss"
                if data["keys"]:
                    _save(path, data)
    if not data["keys"]:
        return model, dataset, "off"  # let the ordinary path raise its "empty dataset" error
    return ProjectedModel(inner), as_feature_dataset(data, dataset), state
