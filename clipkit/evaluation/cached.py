"""Evaluate several states of a model whose vision tower is locked, paying for the tower once.

With a locked image tower (LiT), every checkpoint of a run shares the same tower outputs;
only the projections differ. ``tower_feature_dataset`` runs the tower once over an evaluation
dataset (``clipkit.models.embed.tower_features``) and keeps its (F,) outputs with the labels or
captions; ``clipkit.models.embed.ProjectedModel`` then presents any model state to the
ordinary evaluation drivers with those features standing in for images, so before/after
comparisons or per-checkpoint curves cost one tower pass in total.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn
from tqdm import tqdm

from clipkit.models.embed import tower_features


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


def tower_feature_dataset(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    batch_size: int = 64,
    desc: str = "image tower",
    precision: str = "fp32",
) -> FeatureDataset:
    """Run ``model``'s vision tower once over ``dataset``; keep outputs on the CPU
    (``precision``: see ``clipkit.models.embed.tower_features``)."""
    samples: list[dict[str, Any]] = []
    total = len(dataset) if hasattr(dataset, "__len__") else None
    with tqdm(total=total, desc=desc, unit="img", leave=False) as bar:
        for batch, feats in tower_features(model, dataset, batch_size, precision):  # feats (B, F)
            bar.update(len(batch["key"]))
            for i, key in enumerate(batch["key"]):
                sample: dict[str, Any] = {"image": feats[i].clone(), "key": key}  # own storage
                if "label" in batch:
                    sample["label"] = int(batch["label"][i])
                if "captions" in batch:
                    sample["captions"] = batch["captions"][i]
                samples.append(sample)
    return FeatureDataset(samples, dataset)
