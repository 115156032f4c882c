"""What every tower shares: the ``Tower`` base class, layer grouping, locking, fingerprints.

A tower wraps one backbone (``self.model``) and exposes the contract of ARCHITECTURE.md.
Layers are described by *parameter-name groups* (bottom to top) and turned into
``LayerGroup`` views, so a "layer" may be a block (``blocks.3.1``) as well as a loose set of
modules and root-level parameters (a ViT stem: ``conv1`` + ``class_embedding`` + ...).

Locking (LiT): ``lock(n)`` freezes every parameter except those of the top ``n`` layers and
pins the locked part in eval mode, so a locked tower inside a model in ``train()`` mode
computes exactly what the frozen backbone computes in ``eval()`` mode: no dropout, and
BatchNorm running statistics are never updated (BatchNorm stays in eval mode even inside
unlocked layers, LiT style).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from clipkit.config import AugmentConfig
from clipkit.data.augment import augmented_transform, convert_to_rgb
from clipkit.registry import Registry

log = logging.getLogger(__name__)

TOWERS = Registry("tower")

# Matcher in timm's ``group_matcher()`` format: {group: regex | [(regex, suffix), ...]}.
Matcher = dict[str, Any] | Callable[[str], Any]


class LayerGroup(nn.Module):
    """A view over the modules and loose parameters forming one layer.

    Built on demand by ``Tower.layers()`` and never registered inside the tower, so it
    adds no entries to ``state_dict()`` and cannot go stale after ``.to(device)``.
    """

    def __init__(self, name: str, modules: list[nn.Module], params: list[nn.Parameter]):
        super().__init__()
        self.group_name = name
        for i, m in enumerate(modules):
            self.add_module(f"m{i}", m)
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)

    def extra_repr(self) -> str:
        return self.group_name


class Tower(nn.Module):
    """Base class. Subclasses set ``self.model``, ``out_dim``, ``spec`` and implement ``forward``."""

    modality: str = "vision"
    deterministic_transform: bool = True
    # Whether the tower pools its last feature map over a grid (TowerConfig.pool_grid > 1).
    supports_pool_grid: bool = False
    # Small (modality, TowerConfig kwargs) examples: the parametrized tower tests build each.
    examples: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __init__(self, spec: str, modality: str):
        super().__init__()
        self.spec = spec  # "timm:tf_efficientnet_lite0", ...; part of the fingerprint
        self.modality = modality
        self.out_dim = 0
        self.locked = False
        self.unlocked_layers = 0
        self._fingerprint_extra = ""  # transform / tokenizer settings that change the features
        self.augmentation = AugmentConfig()  # vision: the training transform's (model.vision.augmentation)

    # ------------------------------------------------------------------ per-tower hooks
    def param_groups(self) -> list[list[str]]:
        """Parameter names of ``self.model`` grouped into layers, bottom to top."""
        raise NotImplementedError

    def transform(self, train: bool) -> Callable[[Any], Tensor]:
        raise TypeError(f"{self.spec} is a {self.modality} tower; it has no image transform")

    def tokenize(self, texts: list[str]) -> Tensor:
        raise TypeError(f"{self.spec} is a {self.modality} tower; it has no tokenizer")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's block activations in the backward pass instead of keeping
        them (less memory, one more forward of each block); same gradients. A tower that cannot
        do it raises, naming itself, rather than silently keeping every activation."""
        raise ValueError(no_checkpointing(self.spec, self.modality, self.model))

    # ------------------------------------------------------------------ layers and locking
    def layers(self) -> list[nn.Module]:
        """Bottom-to-top blocks (``LayerGroup`` views over ``self.model``)."""
        return groups_to_layers(self.model, self.param_groups())

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze all parameters but those of the top ``unlocked_layers`` layers (LiT)."""
        layers = self.layers()
        if not 0 <= unlocked_layers <= len(layers):
            raise ValueError(
                f"{self.spec}: unlocked_layers={unlocked_layers} but the tower has {len(layers)} layers "
                f"({', '.join(layer.group_name for layer in layers)})"
            )
        top = layers[len(layers) - unlocked_layers :]
        keep = {id(p) for layer in top for p in layer.parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        self.locked = True
        self.unlocked_layers = unlocked_layers
        self.train(self.training)

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if self.locked:
            _pin_locked_modules(self, self.layers(), self.unlocked_layers, mode)
        return self

    def split_at(self, unlocked_layers: int) -> TowerSplit:
        """This tower's forward cut below its top ``unlocked_layers`` layers (the partial feature
        cache stores ``bottom``'s output); raises ``NoSplit`` for a backbone it cannot cut."""
        raise NoSplit(f"{self.modality} tower {self.spec} ({type(self.model).__name__}) cannot be split")

    # ------------------------------------------------------------------ feature-cache key
    def fingerprint(self, skip_top: int = 0) -> str:
        """sha256 of the spec, the transform/tokenizer settings and every parameter and buffer.

        ``skip_top`` > 0 leaves out the parameters and buffers of the top ``skip_top`` layers
        (and says so in the hash): the key of a partial cache, which those layers never enter, so
        it holds across their training and a resume.
        """
        head = f"{self.spec}|{self._fingerprint_extra}" + (f"|skip_top={skip_top}" if skip_top else "")
        h = hashlib.sha256(head.encode())
        top = self.layers()[-skip_top:] if skip_top else []
        skip = {id(t) for layer in top for t in [*layer.parameters(), *layer.buffers()]}
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if id(t) in skip:
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()[:16]

    def extra_repr(self) -> str:
        lock = f", locked (top {self.unlocked_layers} unlocked)" if self.locked else ""
        return f"{self.spec}, out_dim={self.out_dim}{lock}"


class NoSplit(ValueError):
    """A tower whose forward cannot be cut at the asked layer boundary (the message says why)."""


# A step of a tower's forward: (the module owning its parameters, or None for a parameter-free
# step such as pooling; the function applied). The owner places the step among the layers.
Step = tuple[nn.Module | None, Callable[[Tensor], Tensor]]


@dataclass(frozen=True)
class TowerSplit:
    """A tower's forward cut at a layer boundary: ``top(bottom(x))`` is ``tower(x)``, the same
    operations in the same order. ``bottom`` runs every layer below the top ``unlocked_layers``
    (the locked part), ``top`` those layers and the tower's pooling and head. Modules run in the
    mode the tower put them in (``lock``: locked part and every BatchNorm in eval mode)."""

    unlocked_layers: int
    at: str  # group name of the first top layer, e.g. "blocks.6.0"
    bottom: Callable[[Tensor], Tensor]  # images (B, 3, H, W) -> activations (B, *S)
    top: Callable[[Tensor], Tensor]  # activations (B, *S) -> (B, out_dim)


def _run(steps: list[Step]) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        for _, fn in steps:
            x = fn(x)
        return x

    return run


def split_steps(tower: Tower, steps: list[Step], unlocked_layers: int) -> TowerSplit:
    """Cut ``steps`` (the tower's whole forward, in order) below its top ``unlocked_layers`` layers.

    Each step belongs to the layer holding all of its owner's parameters (a parameter-free step to
    the step before it); the layers must come in order, so the cut is a layer boundary.
    """
    layers = tower.layers()
    names = ", ".join(layer.group_name for layer in layers)
    if not 1 <= unlocked_layers < len(layers):
        raise NoSplit(
            f"{tower.spec}: a split needs 1 <= unlocked_layers < {len(layers)} (its layers: {names}), "
            f"got {unlocked_layers}"
        )
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    tags: list[int] = []
    for owner, _ in steps:
        found = {layer_of.get(id(p), -1) for p in owner.parameters()} if owner is not None else set()
        if len(found) > 1 or -1 in found:
            raise NoSplit(
                f"{tower.spec}: a step of its forward ({type(owner).__name__}) spans layers ({names})"
            )
        tag = found.pop() if found else (tags[-1] if tags else 0)
        if tags and tag < tags[-1]:
            raise NoSplit(f"{tower.spec}: its forward does not run its layers in order ({names})")
        tags.append(tag)
    cut = len(layers) - unlocked_layers
    first_top = next((i for i, t in enumerate(tags) if t >= cut), len(steps))
    if first_top in (0, len(steps)):
        raise NoSplit(
            f"{tower.spec}: no step of its forward falls on each side of layer {layers[cut].group_name}"
        )
    bottom, top = _run(steps[:first_top]), _run(steps[first_top:])
    return TowerSplit(unlocked_layers, layers[cut].group_name, bottom, top)


def _pin_locked_modules(tower: Tower, layers: list[LayerGroup], n_unlocked: int, mode: bool) -> None:
    """Put everything outside the top ``n_unlocked`` layers (and all BatchNorms) in eval mode.

    Ancestors of unlocked layers (the backbone root, containers) keep ``mode``; modules
    outside every layer (e.g. a pooling head without parameters) count as locked.
    """
    live = {id(m) for layer in layers[len(layers) - n_unlocked :] for m in layer.modules()}
    named = list(tower.named_modules())
    live_names = [name for name, m in named if id(m) in live]
    for name, m in named:
        if id(m) in live:
            m.training = mode and not isinstance(m, nn.modules.batchnorm._BatchNorm)
        elif (name == "" and live_names) or any(ln.startswith(name + ".") for ln in live_names):
            m.training = mode  # an ancestor of an unlocked layer
        else:
            m.training = False


# ---------------------------------------------------------------------------- grouping helpers


def group_names(names: Iterable[str], matcher: Matcher) -> list[list[str]]:
    """Group parameter names with a timm-style matcher, bottom to top.

    Unlike ``timm.models.group_parameters`` this never merges a ``(99999,)``-suffixed group
    (e.g. EfficientNet's ``conv_head``/``bn2``) into the last block: the head stays its own
    layer. Names no pattern matches form the top group.
    """
    if isinstance(matcher, dict):
        compiled = []
        for ordinal, spec in enumerate(matcher.values()):
            if spec is None:
                continue
            specs = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
            compiled += [(re.compile(rx), (ordinal,), suffix) for rx, suffix in specs]

        def key(name: str) -> tuple[float, ...]:
            for rx, prefix, suffix in compiled:
                m = rx.match(name)
                if m:
                    parts = [prefix, tuple(int(g) for g in m.groups() if g is not None), suffix or ()]
                    return tuple(float(x) for part in parts for x in part)
            return (math.inf,)
    else:

        def key(name: str) -> tuple[float, ...]:
            k = matcher(name)
            return tuple(float(x) for x in k) if isinstance(k, Iterable) else (float(k),)

    groups: dict[tuple[float, ...], list[str]] = {}
    for name in names:
        groups.setdefault(key(name), []).append(name)
    return [groups[k] for k in sorted(groups)]


def groups_to_layers(root: nn.Module, groups: list[list[str]]) -> list[LayerGroup]:
    """Turn parameter-name groups into ``LayerGroup`` views over ``root``.

    Each group takes the largest submodules whose parameters all belong to it (so their
    parameter-free children, e.g. dropout, come along) plus any loose parameters.
    """
    owner = {name: gi for gi, names in enumerate(groups) for name in names}
    mods: list[list[nn.Module]] = [[] for _ in groups]
    taken: list[str] = []
    for mname, m in root.named_modules():
        if not mname or any(mname.startswith(t + ".") for t in taken):
            continue
        gids = {owner.get(f"{mname}.{pn}") for pn, _ in m.named_parameters()}
        if len(gids) == 1 and None not in gids:
            mods[gids.pop()].append(m)
            taken.append(mname)
    params: list[list[nn.Parameter]] = [[] for _ in groups]
    for pname, p in root.named_parameters():
        if pname in owner and not any(pname.startswith(t + ".") for t in taken):
            params[owner[pname]].append(p)
    names = [_group_label(g) for g in groups]
    return [LayerGroup(n, m, p) for n, m, p in zip(names, mods, params)]


def _group_label(names: list[str]) -> str:
    """'blocks.3.1' for one block, 'conv_stem+bn1' for loose modules."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    if common:
        return ".".join(common)
    return "+".join(dict.fromkeys(n.split(".")[0] for n in names))


def split_around_blocks(names: list[str], block_prefix: str, before: set[str]) -> list[list[str]]:
    """[params in ``before`` top-level modules] + [one group per block] + [the rest].

    For backbones whose blocks live in one ``nn.ModuleList`` at ``block_prefix``
    (``encoder.layer`` in BERT); empty groups are dropped.
    """
    rx = re.compile(rf"^{re.escape(block_prefix)}\.(\d+)\.")
    bottom: list[str] = []
    blocks: dict[int, list[str]] = {}
    top: list[str] = []
    for name in names:
        m = rx.match(name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(name)
        elif name.split(".", 1)[0] in before:
            bottom.append(name)
        else:
            top.append(name)
    return [g for g in [bottom, *(blocks[i] for i in sorted(blocks)), top] if g]


# ---------------------------------------------------------------------------- gradient checkpointing


def no_checkpointing(spec: str, modality: str, backbone: nn.Module, why: str = "") -> str:
    return (
        f"{modality} tower {spec} ({type(backbone).__name__}) does not support gradient checkpointing"
        + (f" ({why})" if why else "")
        + "; set train.grad_checkpointing=false, or lock the tower (model.<tower>.locked=true)"
    )


def set_timm_grad_checkpointing(model: nn.Module, spec: str, modality: str, enable: bool) -> None:
    """timm's ``set_grad_checkpointing`` (blocks via ``checkpoint_seq``), refusals made explicit."""
    try:
        model.set_grad_checkpointing(enable)  # type: ignore[operator]
    except (AssertionError, NotImplementedError, AttributeError) as err:
        raise ValueError(no_checkpointing(spec, modality, model, str(err) or type(err).__name__)) from err


def set_hf_grad_checkpointing(model: nn.Module, spec: str, modality: str, enable: bool) -> None:
    """Hugging Face checkpointing, non-reentrant (correct gradients above frozen layers too).

    ``model``: a ``PreTrainedModel`` (its own API), or a part of one (a CLIP half: encoder
    modules carrying transformers' ``gradient_checkpointing`` flag, switched as that API does).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "supports_gradient_checkpointing"):
        if not model.supports_gradient_checkpointing:
            raise ValueError(no_checkpointing(spec, modality, model))
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names
            if enable:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.activation_checkpointing_disable()
        elif enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()
        return
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if not flagged:
        raise ValueError(no_checkpointing(spec, modality, model))
    for m in flagged:
        m._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)
        m.gradient_checkpointing = enable


# ---------------------------------------------------------------------------- weights files


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file.

    Unwraps the usual ``{"state_dict": ...}`` / ``{"model": ...}`` containers and a
    ``module.`` prefix left by DDP.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file '{path}' not found; weights must be a local file, 'bundled' or '' (random)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise TypeError(f"weights file '{path}' does not hold a state dict (got {type(sd).__name__})")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def image_transform(
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: bool = False,
    augmentation: AugmentConfig | None = None,
) -> Any:
    """PIL -> (3, size, size) float tensor: shorter side to ``size`` (bicubic), center crop, normalize.

    ``augment`` swaps this for the augmented training transform of ``augmentation``
    (``clipkit.data.augment``; default: ``RandomResizedCrop(scale=(0.9, 1))``, open_clip's
    train-time crop); without it the transform is deterministic, so features are cacheable.
    """
    from torchvision import transforms as T

    if augment:
        return augmented_transform(size, mean, std, augmentation or AugmentConfig())
    bicubic = T.InterpolationMode.BICUBIC
    geometry = [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
    return T.Compose([convert_to_rgb, *geometry, T.ToTensor(), T.Normalize(mean, std)])
