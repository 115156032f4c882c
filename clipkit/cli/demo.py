"""The job behind ``clipkit demo``: real data, a LiT model trained on the CPU, before/after scores.

1. Build the emoji shards (twemoji images + names) and the Animal-MNIST zero-shot set.
2. Score the untrained model: pretrained towers, freshly initialised projections.
3. Train ``train/lit_emoji.yaml`` (locked EfficientNet-Lite0 + MiniLM, CLIP loss).
4. Score the trained model and print one before/after table; JSON goes to the run folder.

The image tower is locked, so the eval sets go through it once (``evaluation.cached``) and
both states of the model are scored from the same features. Application code: it lives in the
CLI layer because it imports the builders in ``data_tools/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from clipkit.config import Config, load_config
from clipkit.errors import ClipkitError

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "train" / "lit_emoji.yaml"


def balanced_subset(dataset: Any, per_class: int) -> list[dict[str, Any]]:
    """The first ``per_class`` samples of each label, in dataset order (0 = all)."""
    seen: dict[int, int] = {}
    out = []
    for sample in dataset:
        n = seen.get(sample["label"], 0)
        if per_class <= 0 or n < per_class:
            out.append(sample)
            seen[sample["label"]] = n + 1
    return out


class Listed:
    """A list of decoded samples that keeps the source dataset's metadata."""

    def __init__(self, samples: list[dict[str, Any]], source: Any):
        self.samples, self.name = samples, source.name
        self.task = source.task
        if source.task == "zeroshot_classification":
            self.classnames, self.templates = source.classnames, source.templates

    def __iter__(self):
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def build_data(data_root: Path) -> tuple[Path, Path]:
    from data_tools import build_animal_mnist, build_emoji

    emoji, animals = data_root / "emoji", data_root / "animal_mnist"
    print(f"[1/4] data: emoji shards -> {emoji}, Animal-MNIST -> {animals}", flush=True)
    print(f"      emoji: {build_emoji.build(emoji)}", flush=True)
    print(f"      animal-mnist: {build_animal_mnist.build(animals)}", flush=True)
    return emoji, animals


def score(
    model: torch.nn.Module, zeroshot: Any, retrieval: Any, batch_size: int
) -> dict[str, dict[str, float]]:
    from clipkit.evaluation.retrieval import evaluate_retrieval
    from clipkit.evaluation.zeroshot import evaluate_zeroshot
    from clipkit.models.embed import ProjectedModel

    projected = ProjectedModel(model)
    return {
        "zeroshot": evaluate_zeroshot(projected, zeroshot, batch_size),
        "retrieval": evaluate_retrieval(projected, retrieval, batch_size),
    }


def table_rows(before: dict, after: dict) -> list[dict[str, Any]]:
    picks = [
        ("zero-shot Animal-MNIST top-1", "zeroshot", "acc1"),
        ("zero-shot Animal-MNIST top-5", "zeroshot", "acc5"),
        ("zero-shot Animal-MNIST mean per-class recall", "zeroshot", "mean_per_class_recall"),
        ("emoji text->image R@1", "retrieval", "image_retrieval_recall@1"),
        ("emoji text->image R@5", "retrieval", "image_retrieval_recall@5"),
        ("emoji image->text R@1", "retrieval", "text_retrieval_recall@1"),
        ("emoji image->text R@5", "retrieval", "text_retrieval_recall@5"),
    ]
    return [
        {"metric": label, "before": before[t][m], "after": after[t][m], "gain": after[t][m] - before[t][m]}
        for label, t, m in picks
    ]


def write_results(run_dir: Path, cfg: Config, results: dict[str, dict]) -> None:
    from clipkit.evaluation.report import write_result

    datasets = {"zeroshot": "wds/animal_mnist", "retrieval": "wds/emoji_val"}
    tasks = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
    model_name = f"{cfg.model.vision.name}+{cfg.model.text.name}"
    for state, metrics in results.items():
        for task, values in metrics.items():
            path = run_dir / f"eval_{state}_{task}.json"
            write_result(path, datasets[task], model_name, f"{run_dir}#{state}", tasks[task], values)


def run_demo(overrides: list[str], data_root: Path, zeroshot_per_class: int) -> Path:
    from clipkit.evaluation.cached import tower_feature_dataset
    from clipkit.evaluation.datasets import ClipBenchmarkWds
    from clipkit.evaluation.report import format_table
    from clipkit.models import build_model
    from clipkit.models.load import load_trained
    from clipkit.training.loop import seed_everything, train

    if not RECIPE.is_file():
        raise ClipkitError(f"demo recipe {RECIPE} is missing; run the demo from a clipkit checkout")
    t0 = time.perf_counter()
    emoji_dir, animal_dir = build_data(data_root)
    # The recipe names data/emoji; --data moves the shards, so the recipe follows them (the
    # user's own overrides still come last and win).
    where = [f"data.train={emoji_dir / 'train'}", f"data.val={emoji_dir / 'val'}"]
    cfg = load_config(RECIPE, where + list(overrides))
    seed_everything(cfg.train.seed, False)
    untrained = build_model(cfg.model)

    print("[2/4] scoring the untrained model (locked image tower runs once per eval image)", flush=True)
    animals = ClipBenchmarkWds(animal_dir)
    animals = Listed(balanced_subset(animals, zeroshot_per_class), animals)
    emoji_val = ClipBenchmarkWds(emoji_dir, split="val")
    precision = cfg.train.feature_cache_precision  # the eval images go through the tower as the train ones do
    zs_feats = tower_feature_dataset(untrained, animals, cfg.eval.batch_size, "Animal-MNIST", precision)
    rt_feats = tower_feature_dataset(untrained, emoji_val, cfg.eval.batch_size, "emoji val", precision)
    before = score(untrained, zs_feats, rt_feats, cfg.eval.batch_size)

    print(f"[3/4] training {RECIPE.relative_to(REPO)}", flush=True)
    run_dir = train(cfg)

    print("[4/4] scoring the trained model", flush=True)
    trained, _, _ = load_trained(run_dir)
    after = score(trained, zs_feats, rt_feats, cfg.eval.batch_size)
    write_results(run_dir, cfg, {"before": before, "after": after})
    print()
    print(
        f"Animal-MNIST: {len(zs_feats)} images, 10 classes (chance top-1 0.10); emoji val: {len(rt_feats)} pairs"
    )
    print(format_table(table_rows(before, after)))
    print(f"\nrun folder: {run_dir} (config.yaml, checkpoints/, metrics.csv, curves.png, eval_*.json)")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return run_dir
