"""Evaluation while training: every ``eval.every_samples`` training samples and after the last step.

What runs (``EvalConfig``; ``plan_evaluation`` opens every dataset, checks its class names and
prompts, and checks ``train.keep_best`` before any model is built):

- ``val/loss`` (and ``val/<part>`` for each part the loss returns): the training loss, with the
  training inputs (cached locked-tower features when training uses them), without gradient, in
  eval mode, over the ``data.val`` shards. Each rank reads its shards (``urls[rank::world]``) in
  batches of ``data.batch_size``, each batch its own contrastive batch (``losses.gather.rank_local``:
  no cross-rank negatives, so ranks may hold different numbers of batches). The value is the
  sample-weighted mean over every rank's batches; it equals the one-process value when each val
  shard holds a multiple of ``data.batch_size`` samples (then no batch straddles two shards).
- ``zeroshot/<name>/<metric>``, ``retrieval/<name>/<metric>``, ``linear_probe/<name>/<metric>``:
  the datasets of ``eval.zeroshot``, ``eval.retrieval`` (empty: ``data.val``, named ``val``) and
  ``eval.suite``, through ``clipkit eval``'s own code (``evaluation.runner.prepare`` / ``run_entry``),
  split across ranks (``evaluation.distributed.Ranks``, from accelerate's state). The metrics are
  those of ``clipkit eval`` on the checkpoint of the same step.

The model being trained is evaluated in place (``LiveModel``, no copy): in eval mode during the
evaluation, back in train mode after (a locked tower stays in eval mode, ``Tower.train``). A
frozen tower's outputs never change during a run, so they are computed at the first evaluation
and kept in memory: images as ``FeatureSet`` (each rank its share; keyed by the tower's
fingerprint and the dataset) and texts (prompts, captions) by token ids; later evaluations run
the trainable side only. The RNG state is saved before and restored after, so a run trains the
same weights with or without evaluation.

Results are one metrics.csv row per evaluation (``step``, ``samples_seen``, ``epoch``, the
metrics, ``eval_seconds``; ``clipkit.training.metrics``), TensorBoard scalars under the metric
names, and the evaluation panel of curves.png. ``train.keep_best``: ``clipkit.training.best``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipkit.config import Config
from clipkit.errors import ClipkitError
from clipkit.evaluation.distributed import Ranks, all_gather
from clipkit.evaluation.runner import SHORT_TASK, Prepared, RunOptions, prepare, run_entry
from clipkit.evaluation.suite import Suite, SuiteEntry, load_suite, parse_suite
from clipkit.training import checkpoint as ckpt
from clipkit.training.best import BestKeeper

if TYPE_CHECKING:
    from clipkit.training.loop import Run


# ---------------------------------------------------------------------------- the plan


def _spec_name(spec: str, taken: set[str]) -> str:
    """``data/animal_mnist`` -> ``animal_mnist``; ``data/emoji:val`` -> ``emoji_val`` (as ``clipkit eval``)."""
    from clipkit.evaluation.dataspec import split_spec

    _, path, split = split_spec(spec)
    name = Path(path.rstrip("/")).stem + (f"_{split}" if split else "")
    base, i = name, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _suites(cfg: Config) -> list[Suite]:
    e = cfg.eval
    suites = []
    for task, specs in (("zeroshot", e.zeroshot), ("retrieval", e.retrieval)):
        taken: set[str] = set()
        datasets = [{"name": _spec_name(s, taken), "task": task, "path": s} for s in specs]
        if task == "retrieval" and not specs and cfg.data.val:
            datasets = [{"name": "val", "task": task, "path": cfg.data.val, "format": "shards"}]
        if datasets:
            suites.append(parse_suite({"name": task, "datasets": datasets}, f"eval.{task}"))
    if e.suite:
        suites.append(load_suite(e.suite))
    return suites


def metric_names(prep: Prepared) -> list[str]:
    """The metric columns that ``run_entry`` gives for a prepared dataset."""
    e = prep.entry
    head = f"{SHORT_TASK[e.task]}/{e.name}/"
    if e.task == "zeroshot_classification":
        names = ["acc1", *(["acc5"] if len(prep.classnames or []) >= 5 else []), "mean_per_class_recall"]
    elif e.task == "zeroshot_retrieval":
        names = [f"{side}_retrieval_recall@{k}" for k in e.recall_k for side in ("image", "text")]
    else:
        names = ["lp_acc1", "lp_mean_per_class_recall", "weight_decay", "val_acc1"]
    return [head + n for n in names]


@dataclass
class EvalPlan:
    """What every evaluation runs: ``data.val`` for the loss and the prepared datasets."""

    cfg: Config
    val: str
    prepared: list[Prepared]
    names: list[str]  # the metric columns every evaluation writes (val/<part> columns aside)


def plan_evaluation(cfg: Config) -> EvalPlan | None:
    """The evaluation plan of ``cfg`` (None when nothing is configured); raises ``ClipkitError``
    for a bad eval config, a dataset that does not open or fit its task, or a ``train.keep_best``
    metric that no configured evaluation gives."""
    e, keep = cfg.eval, cfg.train.keep_best
    if e.every_samples < 0:
        raise ClipkitError(
            f"eval.every_samples must be >= 0 (0 = only after the last step), got {e.every_samples}"
        )
    if e.batch_size < 1:
        raise ClipkitError(f"eval.batch_size must be >= 1, got {e.batch_size}")
    suites = _suites(cfg)
    entries: list[SuiteEntry] = [x for s in suites for x in s.entries]
    seen = set()
    for x in entries:
        if (x.task, x.name) in seen:
            raise ClipkitError(
                f"two {SHORT_TASK[x.task]} datasets are named '{x.name}' (eval.suite and eval.*)"
            )
        seen.add((x.task, x.name))
    if not entries and not cfg.data.val:
        if keep:
            raise ClipkitError(
                f"train.keep_best={keep!r} needs an evaluation: set data.val, eval.zeroshot, eval.retrieval or eval.suite"
            )
        return None
    prepared = [prepare(x) for x in entries]  # opens each dataset now: a bad one fails in seconds
    names = (["val/loss"] if cfg.data.val else []) + [n for p in prepared for n in metric_names(p)]
    if keep and keep not in names:
        raise ClipkitError(
            f"train.keep_best={keep!r} is not a metric of this run's evaluation; it will have: {', '.join(names)}"
        )
    return EvalPlan(cfg, cfg.data.val, prepared, names)


# ---------------------------------------------------------------------------- the model seen by evaluation


def frozen(tower: nn.Module) -> bool:
    """A locked tower without trainable parameters: its outputs are the same all run long."""
    return bool(getattr(tower, "locked", False)) and not any(p.requires_grad for p in tower.parameters())


class LiveModel(nn.Module):
    """The DualEncoder being trained, with the evaluation model API (``EvalModel``), no copy.

    ``image_features``: datasets hold the frozen vision tower's (F,) outputs (``FeatureSet``)
    in place of images. ``text_memo``: {token ids: text-tower output} of a frozen text tower,
    filled on first sight (a whole batch at once, so its numbers are those of a plain pass).
    """

    def __init__(self, model: nn.Module, image_features: bool, text_memo: dict[bytes, Tensor] | None):
        super().__init__()
        self.model, self.image_features, self.text_memo = model, image_features, text_memo
        self.name, self.pretrained = "clipkit:training", ""

    def image_transform(self, train: bool = False) -> Any:
        return _identity if self.image_features else self.model.image_transform(False)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.model.tokenize(texts)

    def image_side(self) -> nn.Module:
        """What ``image_inference`` lays out, as for ``clipkit eval``'s model (none for features)."""
        return nn.ModuleList([] if self.image_features else [self.model.vision, self.model.vision_proj])

    def encode_image(self, image: Tensor, normalize: bool = True) -> Tensor:
        if self.image_features:
            return self.model.encode_image(image_features=image, normalize=normalize)
        return self.model.encode_image(image=image, normalize=normalize)

    def encode_text(self, text: Tensor, normalize: bool = True) -> Tensor:
        memo = self.text_memo
        if memo is None:
            return self.model.encode_text(text, normalize=normalize)
        keys = [row.tobytes() for row in text.cpu().numpy()]  # (B, L) ids -> B keys
        if any(k not in memo for k in keys):
            feats = self.model.text(text)  # (B, F)
            for k, f in zip(keys, feats):
                memo.setdefault(k, f)
        x = self.model.text_proj(torch.stack([memo[k] for k in keys]))  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x


def _identity(x: Tensor) -> Tensor:
    return x


class FeatureSet:
    """One rank's share of an evaluation dataset as frozen vision-tower outputs: samples
    ``{"image": (F,), "key", "order", "label" | "captions"}`` with the source's task, class
    names and prompts. ``shard(rank, world)`` is the set itself: it was built for that rank."""

    def __init__(self, samples: list[dict[str, Any]], source: Any, ranks: Ranks, fingerprint: str):
        self.samples, self.ranks, self._fingerprint = samples, ranks, fingerprint
        self.name, self.task = source.name, source.task
        if self.task == "zeroshot_classification":
            try:
                self.classnames, self.templates = source.classnames, source.templates
            except ClipkitError:
                pass  # a linear probe needs no class names

    def __iter__(self) -> Any:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def shard(self, rank: int, world: int) -> FeatureSet:
        if (rank, world) != (self.ranks.rank, self.ranks.world):
            raise ValueError(
                f"{self!r} holds rank {self.ranks.rank} of {self.ranks.world}, not {rank} of {world}"
            )
        return self

    def fingerprint(self) -> str:
        return self._fingerprint

    def __repr__(self) -> str:
        return f"FeatureSet({self.name!r}, rank {self.ranks.rank}: {len(self.samples)} samples)"


def feature_set(
    model: nn.Module, dataset: Any, ranks: Ranks, batch_size: int, workers: int, tower: str
) -> FeatureSet:
    """The vision tower's outputs for this rank's share of ``dataset``, in the batches of a plain
    pass (so the numbers are those of ``encode_image(image=...)``), kept on the CPU."""
    from clipkit.evaluation.embed import image_rows
    from clipkit.models.embed import eval_mode, image_batches, image_inference, model_device

    source = dataset.shard(ranks.rank, ranks.world) if ranks.world > 1 else dataset
    device, samples = model_device(model), []
    with eval_mode(model), image_inference(model) as prep:  # the layout of clipkit eval's pass
        batches = image_batches(model, source, batch_size, workers)

        def encode(images: Tensor) -> Tensor:  # (B, F); CPU lanes for a CNN tower, as clipkit eval
            return model.tower_features(prep(images).to(device)).cpu()

        for batch, feats in image_rows(model.vision, batches, encode, device):
            for i, key in enumerate(batch["key"]):
                sample = {"image": feats[i].clone(), "key": key, "order": batch["order"][i]}  # own storage
                if "label" in batch:
                    sample["label"] = int(batch["label"][i])
                if "captions" in batch:
                    sample["captions"] = batch["captions"][i]
                samples.append(sample)
    fp = hashlib.sha256(f"{tower}|{dataset.fingerprint()}|{ranks}".encode()).hexdigest()[:16]
    return FeatureSet(samples, dataset, ranks, fp)


# ---------------------------------------------------------------------------- evaluating


@dataclass
class Evaluator:
    plan: EvalPlan
    every: int
    ranks: Ranks
    val_cache: Any = None  # FeatureCache of data.val when training reads cached features
    best: BestKeeper | None = None
    vision_tower: str = ""  # fingerprint of a frozen vision tower ("" = it trains)
    text_memo: dict[bytes, Tensor] | None = None
    features: dict[tuple[str, str, str], FeatureSet] = field(default_factory=dict)

    def after_step(self, run: Run, samples: int, done: bool) -> dict[str, float] | None:
        """Evaluate when this step crossed a multiple of ``eval.every_samples`` or was the last
        one; writes the metrics row, offers the value to ``train.keep_best``. All ranks call it."""
        n, seen = self.every, run.samples_seen
        if not (done or (n > 0 and seen // n > (seen - samples) // n)):
            return None
        t0 = time.perf_counter()
        out = self.evaluate(run)
        took = time.perf_counter() - t0
        if run.metrics is not None:
            row = {
                "step": run.step,
                "samples_seen": seen,
                "epoch": run.stream.epoch,
                **out,
                "eval_seconds": took,
            }
            run.metrics.write(row, scalars=out)
            from tqdm import tqdm

            shown = "  ".join(f"{k} {v:.4f}" for k, v in out.items() if k in self.plan.names[:6])
            tqdm.write(f"eval at step {run.step}: {shown}  [{took:.1f} s]")
        if self.best is not None:
            self.best.offer(run, out[self.best.metric])
        run.window["t0"] += time.perf_counter() - t0  # samples/s measures training, not evaluating
        return out

    def evaluate(self, run: Run) -> dict[str, float]:
        """Every metric of the plan for the model as it is now (the same on every rank)."""
        model = run.acc.unwrap_model(run.model)
        rng = ckpt.capture_rng()
        modes = (model.training, run.loss_fn.training)
        model.eval()
        run.loss_fn.eval()
        try:
            out = self.val_loss(run, model) if self.plan.val else {}
            out.update(self.benchmarks(run, model))
        finally:
            model.train(modes[0])
            run.loss_fn.train(modes[1])
            ckpt.restore_rng(rng)
        return out

    def benchmarks(self, run: Run, model: nn.Module) -> dict[str, float]:
        cfg = self.plan.cfg
        live = LiveModel(model, bool(self.vision_tower), self.text_memo).eval()
        opts = RunOptions(
            Path(run.run_dir),
            cfg.eval.batch_size,
            cfg.data.workers,
            str(run.acc.device),
            None,
            False,
            self.ranks,
        )
        if self.vision_tower:  # features in memory: nothing to decode
            opts = dataclasses.replace(opts, num_workers=0)
        out: dict[str, float] = {}
        images: dict[str, Any] = {}  # image embeddings shared by entries on the same dataset
        for prep in self.plan.prepared:
            if self.vision_tower:
                prep = self._with_features(model, prep)
            metrics, _ = run_entry(live, prep, opts, images)
            head = f"{SHORT_TASK[prep.entry.task]}/{prep.entry.name}/"
            out.update(
                {
                    head + k: float(v)
                    for k, v in metrics.items()
                    if k not in ("fewshot_k", "seed", "normalized")
                }
            )
        return out

    def _with_features(self, model: nn.Module, prep: Prepared) -> Prepared:
        data = {}
        for split, ds in prep.data.items():
            key = (prep.entry.task, prep.entry.name, split)
            if key not in self.features:  # first evaluation: the frozen tower runs once
                bs, workers = self.plan.cfg.eval.batch_size, self.plan.cfg.data.workers
                self.features[key] = feature_set(model, ds, self.ranks, bs, workers, self.vision_tower)
            data[split] = self.features[key]
        return dataclasses.replace(prep, data=data)

    def val_loss(self, run: Run, model: nn.Module) -> dict[str, float]:
        """``{"val/loss", "val/<part>"...}``: sample-weighted means over all ranks (module docstring)."""
        from clipkit.data import build_loader
        from clipkit.losses.gather import rank_local
        from clipkit.training.stream import split_inputs

        cfg, acc = self.plan.cfg, run.acc
        transform = None if self.val_cache is not None else model.image_transform(train=False)
        loader = build_loader(
            cfg.data, self.plan.val, transform, model.tokenize, train=False, seed=cfg.train.seed,
            rank=self.ranks.rank, world_size=self.ranks.world, feature_lookup=self.val_cache,
        )  # fmt: skip
        sums: dict[str, float] = {}
        count = 0
        with rank_local(), torch.no_grad(), acc.autocast():
            for batch in loader if loader.shards else []:
                inputs, meta = split_inputs(batch)
                if not meta.keys:
                    continue  # a worker's skip report
                inputs = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                losses = run.loss_fn(model(inputs), inputs)
                for k, v in losses.items():
                    if torch.is_tensor(v) and v.numel() == 1:
                        sums[k] = sums.get(k, 0.0) + float(v) * len(meta.keys)
                count += len(meta.keys)
        parts = all_gather((count, sums), self.ranks)
        total = sum(c for c, _ in parts)
        if total == 0:
            raise ClipkitError(f"data.val={self.plan.val!r} yielded no samples: the validation set is empty")
        keys = sorted({k for _, s in parts for k in s}, key=lambda k: (k != "loss", k))
        return {f"val/{k}": sum(s.get(k, 0.0) for _, s in parts) / total for k in keys}


def start_evaluation(plan: EvalPlan | None, run: Run) -> Evaluator | None:
    """The evaluator of a run being set up (all ranks): frozen towers noted, the ``data.val``
    feature cache built when training uses one, the best value so far restored."""
    if plan is None:
        return None
    cfg, acc = run.cfg, run.acc
    model = acc.unwrap_model(run.model)
    ev = Evaluator(plan, cfg.eval.every_samples, Ranks(acc.process_index, acc.num_processes))
    if frozen(model.vision):
        ev.vision_tower = model.vision.fingerprint()
    if frozen(model.text):
        ev.text_memo = {}
    if plan.val:
        from clipkit.training.feature_cache import build_feature_cache, why_not_cached

        if why_not_cached(cfg, model) is None:  # the val loss reads what training reads
            with acc.main_process_first():
                ev.val_cache, _ = build_feature_cache(
                    model, cfg.data, plan.val, run.run_dir, acc.device, progress=acc.is_local_main_process
                )
    if cfg.train.keep_best:
        ev.best = BestKeeper.resume(run.run_dir, cfg.train.keep_best, acc.num_processes, acc.is_main_process)
    return ev
