"""Evaluate several states of a model whose vision tower is locked, paying for the tower once.

With a locked image tower (LiT), every checkpoint of a run shares the same tower outputs;
only the projections differ. ``tower_feature_dataset`` runs the tower once over a dataset
and keeps its (F,) outputs; ``ProjectedModel`` then presents any model state to the
ordinary evaluation drivers with those features standing in for images, so before/after
comparisons or per-checkpoint curves cost one tower pass in total.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from clipkit.evaluation.embed import eval_mode, image_batches, model_device
from clipkit.models.inference import bulk_inference


class FeatureDataset:
    """Samples ``{"image": Tensor (F,), "label" | "captions", "key"}`` with the source's metadata."""

    def __init__(self, samples: list[dict[str, Any]], source: Any):
        self.samples = samples
        self.name = getattr(source, "name", "features")
        self.task = getattr(source, "task", None)
        if self.task == "zeroshot_classification":  # class names exist only there
            self.classnames, self.templates = source.classnames, source.templates

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"FeatureDataset({self.name!r}, {len(self.samples)} samples)"


class _TowerView(nn.Module):
    """The model seen through its vision tower only (for ``image_batches``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def image_transform(self, train: bool = False) -> Any:
        return self.model.image_transform(False)


def tower_feature_dataset(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    batch_size: int = 64,
    desc: str = "image tower",
    precision: str = "fp32",
) -> FeatureDataset:
    """Run ``model``'s vision tower once over ``dataset``; keep outputs on the CPU.

    The tower runs channels-last (and under bf16 autocast with ``precision="bf16"``), as the
    training feature cache does (``clipkit.models.inference``).
    """
    view = _TowerView(model)
    device = model_device(model)
    samples: list[dict[str, Any]] = []
    total = len(dataset) if hasattr(dataset, "__len__") else None
    with (
        eval_mode(model),
        bulk_inference(model.vision, precision) as prep,
        tqdm(total=total, desc=desc, unit="img", leave=False) as bar,
    ):
        for batch in image_batches(view, dataset, batch_size, 0):
            bar.update(len(batch["key"]))
            feats = model.tower_features(prep(batch["image"].to(device))).float().cpu()  # (B, F)
            for i, key in enumerate(batch["key"]):
                sample: dict[str, Any] = {"image": feats[i].clone(), "key": key}  # own storage
                if "label" in batch:
                    sample["label"] = int(batch["label"][i])
                if "captions" in batch:
                    sample["captions"] = batch["captions"][i]
                samples.append(sample)
    return FeatureDataset(samples, dataset)


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
