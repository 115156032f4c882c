"""The one typed, frozen config tree of a clipkit run.

A recipe is a YAML file (see ``train/``) holding any subset of the tree below; dotted
``key=value`` overrides from the command line are applied on top (values are parsed
as YAML, so ``train.samples=2000`` is an int and ``model.vision.locked=true`` a bool).
Unknown keys and wrong types raise ``ConfigError`` naming the key and the nearest
valid one, before any work starts. Every run writes its resolved ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipkit.errors import ClipkitError
from clipkit.registry import suggest


class ConfigError(ClipkitError, ValueError):
    """A recipe or override that does not fit the config tree."""


@dataclass(frozen=True)
class TowerConfig:
    # Tower spec by prefix: "timm:<arch>", "hf:<dir or 'minilm'>", "open_clip:<model config>".
    name: str = ""
    # Local weights: a file path, "bundled" (weights shipped by an installed package),
    # or "" for random init. Nothing is ever fetched from a hub.
    weights: str = ""
    # LiT: a locked tower runs in eval mode with frozen parameters (BN stats untouched).
    locked: bool = False
    # With locked=true, the top N layers (blocks) stay trainable.
    unlocked_layers: int = 0
    # Learning-rate multiplier for the tower's trainable parameters (projections use 1.0).
    lr_mult: float = 1.0
    # Vision towers: input side in pixels. Text towers: tokenizer context length.
    image_size: int = 224
    context_length: int = 64
    # Vision towers: random-resized-crop augmentation when training (off = the eval
    # transform is used for training too, so a locked tower's features can be cached).
    augment: bool = False


@dataclass(frozen=True)
class ModelConfig:
    vision: TowerConfig = field(
        default_factory=lambda: TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled")
    )
    text: TowerConfig = field(default_factory=lambda: TowerConfig(name="hf:minilm", weights="bundled"))
    # Shared embedding width after the projections.
    embed_dim: int = 256
    # Projection head on each tower: "linear", "mlp" or "none" (tower already projects).
    projection: Literal["linear", "mlp", "none"] = "linear"
    # Learnable temperature, stored as log(1/T); clamped at max_logit_scale.
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    # SigLIP bias; None means the model has no bias parameter.
    init_logit_bias: float | None = None


@dataclass(frozen=True)
class HardNegativesConfig:
    # Sample4Geo batches (clipkit.data.hard_negatives): each sample's k nearest texts (in the
    # current model's embedding space) share its batch in the passes after the first; 0 = off.
    # Needs local, uncompressed shards with a unique idx member per sample.
    k: int = 0
    # Embed the training set again at the first pass boundary after this many samples since
    # the last mining; 0 = at every pass boundary. Passes in between reuse the neighbours.
    every_samples: int = 0
    # Also mine before the first pass, with the initial model. Meaningful when the towers are
    # pretrained (LiT): fresh random heads roughly keep the towers' neighbourhoods.
    from_start: bool = False


@dataclass(frozen=True)
class DataConfig:
    # Shard URLs: brace patterns ("shards/train-{000000..000009}.tar"), "::"-joined
    # lists, local paths or "pipe:" commands.
    train: str = ""
    val: str = ""
    batch_size: int = 64
    workers: int = 0
    # Shard-level shuffle of the shard list, then a sample buffer of this size (0 = off).
    shuffle_buffer: int = 1000
    # What a corrupt sample does: "skip" (counted and reported) or "raise".
    on_error: Literal["skip", "raise"] = "skip"
    # Tar member extensions holding the caption and the image (first match wins).
    caption_key: str = "txt"
    image_keys: str = "jpg;jpeg;png;webp"
    # torch threads per loader worker (and in the main process when workers=0).
    threads_per_worker: int = 1
    # Caption augmentation in training ("Improved baselines for vision-language pre-training",
    # clipkit.data.text_augment): drop each word with this probability (one word always stays),
    # and shuffle the word order. Drawn per sample from (seed, epoch, key): deterministic.
    word_dropout: float = 0.0
    word_shuffle: bool = False
    hard_negatives: HardNegativesConfig = field(default_factory=HardNegativesConfig)


@dataclass(frozen=True)
class LossConfig:
    # Registered loss name (clipkit.losses.LOSSES).
    name: str = "clip"
    # Keyword arguments of that loss; checked against its signature.
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    # Linear warmup length in optimizer steps, then cosine decay to min_lr_ratio * lr.
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    # Max global grad norm; 0 disables clipping.
    grad_clip: float = 1.0
    # Micro-batches accumulated per optimizer step.
    accum_steps: int = 1


@dataclass(frozen=True)
class TrainConfig:
    # Training length as a budget of samples seen (an "epoch" is one pass over the
    # shards; with a budget the stream simply restarts until the budget is reached).
    samples: int = 10_000
    seed: int = 0
    # "fp32" or "bf16" (autocast, CPU and GPU).
    precision: Literal["fp32", "bf16"] = "fp32"
    # Run folder is <output_dir>/<run_name>; empty name = timestamp.
    output_dir: str = "runs"
    run_name: str = ""
    checkpoint_every: int = 100
    keep_last: int = 3
    # "" (fresh), "latest" (newest good checkpoint of this run folder) or a path.
    resume: str = ""
    # Cache outputs of locked towers with deterministic transforms on disk.
    feature_cache: bool = True
    # Precision of the locked tower while it fills the cache: "fp32", or "bf16" autocast (about
    # 2x faster on CPUs with AVX512-BF16; ~3 significant digits; a cache of its own).
    feature_cache_precision: Literal["fp32", "bf16"] = "fp32"
    log_every: int = 10
    # Use deterministic algorithms (bit-identical reruns).
    deterministic: bool = False
    # Gradient caching: run the towers on at most this many samples at a time while the loss
    # still sees the whole batch (same gradients as one big batch); 0 = off.
    grad_cache_micro_batch: int = 0
    # torch intra-op threads of the training process; 0 = torch's default (one per core). On a
    # machine shared with other busy jobs, 1 can be several times faster (no threads left
    # spinning while they wait for each other).
    threads: int = 0
    # Watchdog: report (rank, loader worker, shard) when no batch has come for this many
    # seconds, again every as many seconds while it lasts; 0 = off.
    stall_timeout_s: float = 300.0
    # A step with a non-finite loss or gradient is skipped (no parameter or optimizer change,
    # counted in metrics.csv); after this many in a row the run stops, keeping its last good
    # checkpoint; 0 = never stop.
    max_nonfinite_steps: int = 5
    # Append the idx of every trained sample to sample_ids.log, one line per step (see
    # clipkit.training.sample_log): proof of what a run, resumed or not, trained on.
    log_sample_ids: bool = False


@dataclass(frozen=True)
class EvalConfig:
    # CLIP_benchmark local-webdataset folders (with test/ shards, classnames.txt, templates).
    zeroshot: str = ""
    # Retrieval shards (image + caption(s)); empty = data.val.
    retrieval: str = ""
    batch_size: int = 128


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- building


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from nested ``data`` laid over ``base`` (default: ``cls()``).

    Unknown keys and bad types raise. A partial section keeps the defaults of the
    enclosing tree: ``model.vision.locked=true`` keeps ``ModelConfig``'s vision tower name.
    """
    base = cls() if base is None else base
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            known = [prefix + n for n in names]
            raise ConfigError(
                f"unknown config key '{full}';{suggest(full, known)} valid keys here: {', '.join(known)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, full + ".", getattr(base, key))
        elif tp is float and isinstance(value, str) and _is_float(value):
            kwargs[key] = float(value)  # YAML 1.1 reads "1e-6" (no dot) as a string
        elif not _type_ok(value, tp):
            raise ConfigError(f"config key '{full}' must be {_type_name(tp)}, got {value!r}")
        else:
            kwargs[key] = float(value) if tp is float else value
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.samples=2000)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "args":
            out[k] = merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Recipe YAML + dotted overrides -> validated frozen ``Config``."""
    tree: dict[str, Any] = {}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(
                f"recipe '{recipe}' not found; recipes ship in train/ (e.g. train/lit_emoji.yaml)"
            )
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe '{recipe}' must hold a mapping at top level")
        tree = loaded
    tree = merge(tree, parse_overrides(overrides or []))
    return from_dict(Config, tree)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Any, **changes: Any) -> Any:
    """Dotted-key replace on a frozen tree: ``replace(cfg, **{"train.samples": 10})``."""
    tree = to_dict(cfg)
    for k, v in changes.items():
        _set_dotted(tree, k, v)
    return from_dict(type(cfg), tree)
