"""Training objectives, one registered module each: ``build_loss(cfg.loss)``.

Every loss is an ``nn.Module`` whose ``forward(out, batch=None)`` returns
``{"loss": scalar, <named parts>}``; ``out`` is the DualEncoder output dict. The registered
names and what each needs are listed by ``LOSSES.names()`` and in each class docstring.
"""

from __future__ import annotations

import inspect

from torch import nn

from clipkit.config import LossConfig
from clipkit.losses import (  # noqa: F401  (importing a module registers its losses)
    albef_md,
    clip,
    clip_unif_align,
    cwcl,
    dcl,
    distill,
    isogclr,
    m3col,
    mochi,
    mv_infonce,
    siglip,
    sogclr,
    tiled_clip,
    tiled_siglip,
    tiled_zoo,
)
from clipkit.losses.base import LOSSES
from clipkit.losses.stats import embedding_stats

__all__ = ["LOSSES", "build_loss", "embedding_stats"]


def build_loss(cfg: LossConfig) -> nn.Module:
    """The registered loss ``cfg.name`` built with ``cfg.args``.

    Unknown names and options raise with a suggestion (``LOSSES.build``); so does a
    required option that is missing (``num_samples`` of ``sogclr``, for instance).
    """
    params = inspect.signature(LOSSES.get(cfg.name)).parameters.values()
    missing = [
        p.name
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in cfg.args
    ]
    if missing:
        raise TypeError(
            f"loss '{cfg.name}' needs option {', '.join(repr(m) for m in missing)}: "
            f"set loss.args.{missing[0]}=... in the recipe or on the command line"
        )
    return LOSSES.build(cfg.name, **cfg.args)
