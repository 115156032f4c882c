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
class AugmentConfig:
    # Image augmentation of a vision tower's training transform (clipkit.data.augment), used by
    # model.vision.augment=true: uncached, drawn anew per sample and step; with train.cache_views=K,
    # K views per image computed once into the feature cache. Steps run in this order.
    # RandomResizedCrop: the crop's area fraction and aspect-ratio range (open_clip's defaults).
    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    # Probability of a horizontal flip.
    hflip: float = 0.0
    # Probability of the image's silhouette: pixels unlike the border's colour white, the rest
    # black (emoji / clip-art -> silhouettes such as Animal-MNIST's).
    silhouette: float = 0.0
    # Colour jitter (torchvision ColorJitter): brightness, contrast and saturation factors drawn
    # from [1 - x, 1 + x], hue shifted by up to +-hue (<= 0.5); 0 = that jitter off.
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    # Probability of a grayscale image (3 equal channels).
    grayscale: float = 0.0
    # Probability of inverted colours (white-on-black silhouettes <-> black-on-white drawings).
    invert: float = 0.0
    # Probability of a Gaussian blur, its sigma drawn from blur_sigma (pixels of the output).
    blur: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # Seed of the cached views (train.cache_views): view v of sample key k is drawn from
    # (view_seed, k, v) alone. Another seed, or any other setting here, is another cache folder.
    view_seed: int = 0

    def __post_init__(self) -> None:
        _check_augment(self)


def _check_augment(cfg: AugmentConfig) -> None:
    """Ranges of model.<tower>.augmentation (see AugmentConfig)."""

    def pair(name: str, lo: float, hi: float) -> None:
        v = getattr(cfg, name)
        if len(v) != 2 or not lo <= v[0] <= v[1] <= hi:
            raise ConfigError(f"augmentation.{name} must be [low, high] in [{lo}, {hi}], got {v}")

    pair("scale", 1e-6, 1.0)
    pair("ratio", 1e-6, math.inf)
    pair("blur_sigma", 1e-6, math.inf)
    for name in ("hflip", "silhouette", "grayscale", "invert", "blur"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"augmentation.{name} is a probability in [0, 1], got {getattr(cfg, name)}")
    for name in ("brightness", "contrast", "saturation"):
        if not 0.0 <= getattr(cfg, name):
            raise ConfigError(f"augmentation.{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.hue <= 0.5:
        raise ConfigError(f"augmentation.hue must be in [0, 0.5], got {cfg.hue}")


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
    # Vision towers: augmentation when training, as set in `augmentation` (off = the eval
    # transform is used for training too, so a locked tower's features can be cached; with
    # train.cache_views=K > 1 augmented views are cached too).
    augment: bool = False
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    # Vision towers (timm): the last feature map average-pooled over a pool_grid x pool_grid grid
    # and flattened, so the head sees where a part is (out_dim x pool_grid^2 features; a flag's
    # stripes, a silhouette's legs); 1 = global average pooling, the backbone's own.
    pool_grid: int = 1


@dataclass(frozen=True)
class ModelConfig:
    # Pretrained starting point (clipkit.models.init): a model spec, "open_clip:<config>[@<weights
    # file>]" (config: a name, a model-config .json or local-dir:<folder>) or "hf-clip:<Hugging Face
    # CLIP/SigLIP folder>". Both towers become the two halves of that model, with its projections,
    # embed_dim, logit scale and bias, so the model starts out embedding exactly as the spec does.
    # It fixes the towers' name / weights / image_size / context_length and embed_dim, projection,
    # init_logit_scale, init_logit_bias: leave those out (a value other than the default or the
    # spec's is a ConfigError), except init_logit_bias on a spec without a bias (CLIP), which adds
    # one. locked, unlocked_layers, lr_mult and augment apply as usual.
    init: str = ""
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
    # Training with workers: start the next pass's workers before the current pass ends (once
    # its workers have read all their shards), so no step waits for new workers at a pass
    # boundary (clipkit.training.stream). Both passes' workers are alive meanwhile; false opens
    # each pass only when the last one has ended (less memory at the boundary). Same batches.
    open_next_pass_early: bool = True
    # Caption augmentation in training ("Improved baselines for vision-language pre-training",
    # clipkit.data.text_augment): drop each word with this probability (one word always stays),
    # and shuffle the word order. Drawn per sample from (seed, epoch, key): deterministic.
    word_dropout: float = 0.0
    word_shuffle: bool = False
    # Caption templates in training (clipkit.data.caption_templates): each caption (after word
    # dropout / shuffle) goes into a template drawn per sample from (seed, epoch, key), e.g.
    # "an emoji of {}." ({} or {c} marks the caption), so training captions look like test
    # prompts. An entry ending in .txt without braces is a file, one template per line.
    caption_templates: list[str] = field(default_factory=list)
    # Probability that a training caption is templated; the others keep the raw caption.
    caption_template_prob: float = 1.0
    hard_negatives: HardNegativesConfig = field(default_factory=HardNegativesConfig)
    # Training only (clipkit.data.resample): each (rank, worker) draws shards with replacement,
    # endlessly, from an RNG seeded by (seed, rank, worker); any number of shards feeds any
    # number of ranks x workers. There are no passes then: the epoch stays 0 and train.samples
    # alone sets the length. Exact resume holds (the RNG states are in the checkpoint).
    resampled: bool = False
    # A weighted mixture (needs resampled=true): with weights, each "::"-separated part of
    # data.train is one source, and each sample comes from source i with probability
    # weight_i / sum(weights), whatever the sources' sizes. Empty: "::" only joins shard lists
    # into one source. Per-source trained samples go to metrics.csv (samples_src<i>).
    train_weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_mixture(self)
        _check_caption_templates(self)


def is_template_file(entry: str) -> bool:
    """Whether a data.caption_templates entry names a file of templates (not a template)."""
    return entry.endswith(".txt") and "{" not in entry and "}" not in entry


def caption_template_error(template: str) -> str | None:
    """Why ``template`` cannot wrap a caption, or None: it must format with
    ``template.format(caption, c=caption)`` and contain the caption."""
    marker = "\x00caption\x00"
    try:
        ok = marker in template.format(marker, c=marker)
    except (KeyError, IndexError, ValueError, AttributeError):
        ok = False
    if ok:
        return None
    return (
        f"caption template {template!r} must contain '{{}}' or '{{c}}' for the caption and no other "
        "'{...}' field (write '{{' and '}}' for literal braces)"
    )


def _check_caption_templates(cfg: DataConfig) -> None:
    """Inline data.caption_templates now; template files when the training loader is built."""
    for entry in cfg.caption_templates:
        if not is_template_file(entry) and (err := caption_template_error(entry)):
            raise ConfigError(f"data.caption_templates: {err}; or name a .txt file, one template per line")
    if not 0.0 <= cfg.caption_template_prob <= 1.0:
        raise ConfigError(f"data.caption_template_prob must be in [0, 1], got {cfg.caption_template_prob}")


def _check_mixture(cfg: DataConfig) -> None:
    """data.resampled / data.train_weights against the rest of data (see DataConfig)."""
    weights = cfg.train_weights
    if cfg.resampled and cfg.hard_negatives.k > 0:
        raise ConfigError(
            "data.hard_negatives.k > 0 mines neighbours at pass boundaries, and with data.resampled=true "
            "there are none: set data.hard_negatives.k=0 or data.resampled=false"
        )
    if not weights:
        return
    if not cfg.resampled:
        raise ConfigError(
            "data.train_weights needs data.resampled=true: a mixture draws samples from its sources with "
            "replacement; without resampling every shard is read once per epoch and the sources' sizes "
            "fix the proportions"
        )
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float))]
    if bad or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"data.train_weights must be positive finite numbers, got {weights!r}")
    sources = [part for part in cfg.train.split("::") if part.strip()]
    if cfg.train and len(sources) != len(weights):  # (a DataConfig for build_loader may have no train)
        raise ConfigError(
            f"data.train_weights has {len(weights)} weight(s) but data.train has {len(sources)} "
            "'::'-separated source(s); give one weight per source"
        )


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
    # How AdamW runs its update (the same math; clipkit.training.optim): "fused" (one kernel over
    # all parameters, CPU and GPU), "foreach" (batched tensor ops), "for_loop" (one parameter at a
    # time, torch's CPU default), or "auto": fused, except foreach under train.precision=fp16 (the
    # gradient scaler's skipped steps are only seen without fused) or where fused is not built.
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"


@dataclass(frozen=True)
class TrainConfig:
    # Training length as a budget of samples seen (an "epoch" is one pass over the
    # shards; with a budget the stream simply restarts until the budget is reached).
    samples: int = 10_000
    seed: int = 0
    # "fp32"; "bf16" (autocast, CPU and GPU); or "fp16" (autocast + a gradient scaler that skips
    # overflowing steps and lowers its scale; on CPU it runs, slowly, to test the GPU path).
    # See clipkit.training.precision. "auto": bf16 where the hardware computes in it (a GPU with
    # bf16; a CPU with AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo), else fp32; the choice and
    # its reason are printed at the start of the run and kept in config.yaml.
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
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
    # With model.vision.unlocked_layers=k on a locked vision tower, the feature cache keeps the
    # activations entering the top k layers instead (clipkit.training.partial_cache), unless its
    # estimated size (float16) exceeds this many GB; then the run trains without a cache.
    partial_cache_max_gb: float = 4.0
    # Augmented views in the feature cache (needs model.vision.augment=true): K > 1 stores K views
    # of each image, computed once (view 0 the eval transform, views 1..K-1 augmented per
    # model.vision.augmentation); each training step draws one per sample from (seed, epoch, key).
    # 0 or 1 = one deterministic view (an augmenting tower is then not cached).
    cache_views: int = 0
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
    # Keep checkpoints/best.pt (+ best.json: metric, value, step): the checkpoint whose value of
    # this evaluation metric (a metrics.csv column, e.g. zeroshot/animal_mnist/acc1 or val/loss)
    # is the best so far. Losses (names starting with "loss") are minimised, everything else
    # (accuracies, recalls) maximised; a tie keeps the earlier one. "" = off.
    keep_best: str = ""
    # torch.compile the model's forward (clipkit.training.compute) with this backend: "inductor"
    # (the default, generated kernels), or any name of torch._dynamo.list_backends(exclude_tags=()),
    # e.g. "aot_eager" (same graph capture and autograd, no code generation: quick to compile).
    compile: bool = False
    compile_backend: str = "inductor"
    # Gradient (activation) checkpointing in every tower with trainable parameters: blocks
    # recompute their activations in the backward pass (less memory, about 30% more compute).
    # A tower that cannot do it is an error naming it.
    grad_checkpointing: bool = False
    # Experiment trackers beside metrics.csv (clipkit.training.trackers), rank 0 only: "wandb"
    # (offline, into <run>/wandb/; `wandb sync` uploads it later) and/or "mlflow" (local file
    # store <run>/mlruns unless tracker_uri); a list, or one comma-separated string ("wandb,mlflow").
    # Empty = none. Needs `pip install 'clipkit[tracking]'`; a resume continues the same runs.
    tracker: list[str] = field(default_factory=list)
    # MLflow tracking URI (e.g. sqlite:///mlflow.db, http://host:5000); "" = file:<run>/mlruns.
    tracker_uri: str = ""
    # W&B project and MLflow experiment name.
    tracker_project: str = "clipkit"


@dataclass(frozen=True)
class EvalConfig:
    # Evaluation while training (clipkit.training.evaluate): every this many training samples
    # (all ranks) and after the last step; 0 = only after the last step. It runs when any of
    # data.val, zeroshot, retrieval or suite below is set; results go to metrics.csv as
    # val/loss, zeroshot/<name>/acc1, retrieval/<name>/image_retrieval_recall@5, ...
    every_samples: int = 0
    # Zero-shot classification datasets: a list of dataset specs as `clipkit eval --dataset`
    # takes them (a CLIP_benchmark folder, clipkit shards, class folders, a manifest; a single
    # string is a one-element list). <name> is the folder's (file's) name, plus _<split>.
    zeroshot: list[str] = field(default_factory=list)
    # Retrieval datasets (images with captions), likewise; empty = data.val (named "val").
    retrieval: list[str] = field(default_factory=list)
    # A suite file (eval/*.yaml): its zeroshot, retrieval and linear_probe datasets, by name.
    suite: str = ""
    # Images (and prompts / captions) per batch of the evaluation passes, per rank.
    batch_size: int = 128


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        views = self.train.cache_views
        if views < 0:
            raise ConfigError(f"train.cache_views must be >= 0, got {views}")
        if views > 1 and not self.model.vision.augment:
            raise ConfigError(
                f"train.cache_views={views} caches augmented views, but model.vision.augment=false: set "
                "model.vision.augment=true (settings: model.vision.augmentation.*) or train.cache_views=0"
            )


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
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
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
        elif tp == list[str] and isinstance(value, str):
            kwargs[key] = [value] if value else []  # key=one/path; "" (older configs) = none
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
