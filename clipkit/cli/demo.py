"""The job behind ``clipkit demo``: real data, a LiT model trained on the CPU, before/after scores.

1. Build the emoji shards (twemoji images + names) and the Animal-MNIST zero-shot set, and
   any other bundled source the recipe reads from data/<name>/ (``openclipart``).
2. Score the untrained model: pretrained towers, freshly initialised projections.
3. Train the recipe: ``train/lit_mix.yaml`` (locked EfficientNet-Lite0 + MiniLM, CLIP loss, emoji
   + openclipart 2:1 with caption templates) unless ``--recipe`` names another
   (``train/lit_emoji.yaml``: emoji only, the demo's recipe before #14).
4. Score the trained model and print one before/after table; JSON goes to the run folder.

The image tower is locked, so the eval sets go through it once (``evaluation.cached``) and
both states of the model are scored from the same features. Application code: it lives in the
CLI layer because it imports the builders in ``data_tools/``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from clipkit.config import Config, load_config
from clipkit.errors import ClipkitError

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "train" / "lit_mix.yaml"  # chosen in #14: benchmarks/recipes_analysis.md


def balanced_subset(dataset: Any, per_class: int) -> list[dict[str, Any]]:
    """The first ``per_class`` samples of each label, in dataset order (0 = all); reading stops
    once each of the dataset's ``classnames`` has them."""
    seen: dict[int, int] = {}
    out: list[dict[str, Any]] = []
    classes = len(getattr(dataset, "classnames", []))
    for sample in dataset:
        n = seen.get(sample["label"], 0)
        if per_class <= 0 or n < per_class:
            out.append(sample)
            seen[sample["label"]] = n + 1
            if per_class > 0 and classes and len(out) == classes * per_class:
                break
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


def recipe_sources(cfg: Config) -> list[str]:
    """The bundled sources (BUILDERS names) that the recipe's data.train / data.val read from
    data/<folder>/..., in order: "data/openclipart/train" -> "openclipart"."""
    from clipkit.data.builders import BUILDERS
    from data_tools import load_builders

    load_builders()
    names = []
    for part in f"{cfg.data.train}::{cfg.data.val}".split("::"):
        parts = Path(part.strip()).parts
        name = parts[1].replace("_", "-") if len(parts) > 1 and parts[0] == "data" else ""
        if name in BUILDERS.names() and name not in names:
            names.append(name)
    return names


def first_shards(spec: str, samples: int, at_least: int = 1) -> str:
    """``spec`` with each "::" part cut to its first shards that hold ``samples`` samples
    (``sizes.json``), and at least ``at_least`` shards (every loader worker reads its own), so a
    short run reads and caches only those. A part whose shards are not all listed in
    ``sizes.json`` stays whole; the number of parts (sources) never changes."""
    from clipkit.data.urls import expand_urls, shard_sizes

    parts = []
    for part in (p.strip() for p in spec.split("::") if p.strip()):
        shards = expand_urls(part)
        sizes = shard_sizes(shards)
        if len(sizes) != len(shards):
            parts.append(part)
            continue
        counts = [sizes[s] for s in shards]
        keep = next((i + 1 for i in range(len(shards)) if sum(counts[: i + 1]) >= samples), len(shards))
        parts.append(
            part if max(keep, at_least) >= len(shards) else brace_list(shards[: max(keep, at_least)])
        )
    return "::".join(parts)


def brace_list(shards: list[str]) -> str:
    """One shard-spec part naming exactly ``shards``: "dir/shard-{000000..000003}.tar" when they
    are numbered in a row, else "dir/{a.tar,b.tar}" (or "{dir/a.tar,other/b.tar}")."""
    if len(shards) == 1:
        return shards[0]
    parents = {str(Path(s).parent) for s in shards}
    if len(parents) > 1:
        return "{" + ",".join(shards) + "}"
    parent = parents.pop()
    found = [re.fullmatch(r"(.*?)(\d+)(\D*)", Path(s).name) for s in shards]
    named = [m.groups() for m in found if m]  # (head, number, tail): "shard-", "000003", ".tar"
    if len(named) == len(shards) and len({(h, len(n), t) for h, n, t in named}) == 1:
        numbers = [int(n) for _, n, _ in named]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            head, first, tail = named[0]
            return f"{parent}/{head}{{{first}..{named[-1][1]}}}{tail}"
    return f"{parent}/{{{','.join(Path(s).name for s in shards)}}}"


def first_pairs(dataset: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of ``dataset`` in its order (0 = all)."""
    out = []
    for sample in dataset:
        if 0 < n <= len(out):
            break
        out.append(sample)
    return out


def relocate(spec: str, data_root: Path) -> str:
    """``spec`` (a "::" list) with each leading "data/" replaced by ``data_root``."""
    parts = [p.strip() for p in spec.split("::")]
    return "::".join(str(data_root / p[len("data/") :]) if p.startswith("data/") else p for p in parts)


def build_data(data_root: Path, extra: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Build emoji and Animal-MNIST (the demo's scores read them) and the ``extra`` bundled
    sources a recipe trains on (``openclipart``), each into data_root/<name with '_'>."""
    from clipkit.data.builders import run_builder
    from data_tools import load_builders

    load_builders()
    emoji, animals = data_root / "emoji", data_root / "animal_mnist"
    print(f"[1/4] data: emoji shards -> {emoji}, Animal-MNIST -> {animals}", flush=True)
    print(f"      emoji: {run_builder('emoji', emoji)}", flush=True)
    print(f"      animal-mnist: {run_builder('animal-mnist', animals)}", flush=True)
    for name in [n for n in extra if n not in ("emoji", "animal-mnist")]:
        out, t0 = data_root / name.replace("-", "_"), time.perf_counter()
        counts = run_builder(name, out)
        print(f"      {name} -> {out}: {counts} ({time.perf_counter() - t0:.0f} s)", flush=True)
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


def shrink(cfg: Config, samples: int | None, out: Path | None) -> list[str]:
    """Overrides for a short run: ``samples`` -> ``train.samples`` and only the first training
    shards that hold them, one at least per loader worker (``first_shards``); ``out`` ->
    ``train.output_dir``."""
    extra = []
    if samples is not None:
        if samples <= 0:
            raise ClipkitError(f"demo --samples must be > 0, got {samples}")
        shards = first_shards(cfg.data.train, samples, max(1, cfg.data.workers))
        spec = json.dumps(shards)  # quoted: YAML would read "{a,b}" as a mapping
        extra += [f"train.samples={samples}", f"data.train={spec}"]
    if out is not None:
        extra.append(f"train.output_dir={out}")
    return extra


def run_demo(
    overrides: list[str],
    data_root: Path,
    zeroshot_per_class: int,
    recipe: str | Path = RECIPE,
    samples: int | None = None,
    retrieval_pairs: int = 0,
    out: Path | None = None,
) -> Path:
    """The demo (module docstring). ``samples``: train on that many samples from the first
    training shards that hold them, instead of the recipe's ``train.samples`` over all of them;
    ``retrieval_pairs``: score the first that many emoji val pairs (0 = all); ``out``: the runs
    folder (``train.output_dir``). The user's ``overrides`` win over all three."""
    from clipkit.evaluation.cached import tower_feature_dataset
    from clipkit.evaluation.datasets import ClipBenchmarkWds
    from clipkit.evaluation.report import format_table
    from clipkit.models import build_model
    from clipkit.models.load import load_trained
    from clipkit.training.loop import seed_everything, train

    recipe = Path(recipe)
    if not recipe.is_file() and (REPO / recipe).is_file():  # train/lit_mix.yaml from elsewhere
        recipe = REPO / recipe
    if not recipe.is_file():
        raise ClipkitError(f"demo recipe {recipe} is missing; run the demo from a clipkit checkout")
    t0 = time.perf_counter()
    named = load_config(recipe, list(overrides))
    emoji_dir, animal_dir = build_data(data_root, recipe_sources(named))
    # The recipe names data/emoji (data/openclipart ...); --data moves the shards, so the recipe
    # follows them (the user's own overrides still come last and win).
    where = [f"data.{k}={relocate(getattr(named.data, k), data_root)}" for k in ("train", "val")]
    moved = load_config(recipe, where)
    cfg = load_config(recipe, where + shrink(moved, samples, out) + list(overrides))
    seed_everything(cfg.train.seed, False)
    untrained = build_model(cfg.model)

    print("[2/4] scoring the untrained model (locked image tower runs once per eval image)", flush=True)
    animals = ClipBenchmarkWds(animal_dir)
    animals = Listed(balanced_subset(animals, zeroshot_per_class), animals)
    emoji_val = ClipBenchmarkWds(emoji_dir, split="val")
    if retrieval_pairs > 0:
        emoji_val = Listed(first_pairs(emoji_val, retrieval_pairs), emoji_val)
    precision = cfg.train.feature_cache_precision  # the eval images go through the tower as the train ones do
    zs_feats = tower_feature_dataset(untrained, animals, cfg.eval.batch_size, "Animal-MNIST", precision)
    rt_feats = tower_feature_dataset(untrained, emoji_val, cfg.eval.batch_size, "emoji val", precision)
    before = score(untrained, zs_feats, rt_feats, cfg.eval.batch_size)

    print(f"[3/4] training {recipe}", flush=True)
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
