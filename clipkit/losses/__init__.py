"""Training objectives, one registered module each: ``build_loss(cfg.loss)``.

Every loss is an ``nn.Module`` whose ``forward(out, batch=None)`` returns
``{"loss": scalar, <named parts>}``; ``out`` is the DualEncoder output dict. The registered
names and what each needs are listed by ``LOSSES.names()`` and in each class docstring.
"""

from __future__ import annotations

from torch import nn

from clipkit.config import LossConfig
from clipkit.losses import (  # noqa: F401  (importing a module registers its losses)
    clip,
    clip_unif_align,
    cwcl,
    dcl,
    isogclr,
    mv_infonce,
    siglip,
    sogclr,
)
from clipkit.losses.base import LOSSES
from clipkit.losses.stats import embedding_stats

__all__ = ["LOSSES", "build_loss", "embedding_stats"]


def build_loss(cfg: LossConfig) -> nn.Module:
    """The registered loss ``cfg.name`` built with ``cfg.args`` (unknown names/args raise)."""
    return LOSSES.build(cfg.name, **cfg.args)
