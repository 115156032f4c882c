"""The dual encoder: two towers, two projection heads, a learnable temperature (and bias).

Submodule names are part of the contract (the trainer builds parameter groups from them):
``vision``, ``text`` (towers), ``vision_proj``, ``text_proj``, ``logit_scale`` and, for
SigLIP-style models, ``logit_bias``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipkit.config import ModelConfig
from clipkit.models.projection import build_projection
from clipkit.models.towers import Tower, build_towers


class DualEncoder(nn.Module):
    def __init__(
        self,
        vision: Tower,
        text: Tower,
        embed_dim: int,
        projection: str = "linear",
        init_logit_scale: float = 2.6592600369262695,  # ln(1 / 0.07)
        max_logit_scale: float = 4.605170185988092,  # ln(100)
        init_logit_bias: float | None = None,
    ):
        super().__init__()
        self.vision = vision
        self.text = text
        self.vision_proj = build_projection(
            projection, vision.out_dim, embed_dim, f"vision tower {vision.spec}"
        )
        self.text_proj = build_projection(projection, text.out_dim, embed_dim, f"text tower {text.spec}")
        self.embed_dim = embed_dim
        self.max_logit_scale = max_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))  # log(1 / T)
        self.logit_bias = (
            None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        )

    # ------------------------------------------------------------------ encoders
    def tower_features(self, image: Tensor) -> Tensor:
        """Raw vision-tower output (B, vision.out_dim): what the feature cache stores."""
        return self.vision(image)

    def encode_image(
        self,
        image: Tensor | None = None,
        image_features: Tensor | None = None,
        normalize: bool = True,
        image_activations: Tensor | None = None,
    ) -> Tensor:
        """Images (B, 3, H, W), cached tower features (B, F) or cached activations (B, *S) entering
        the vision tower's unlocked top layers (the partial feature cache) -> embeddings (B, D)."""
        if sum(x is not None for x in (image, image_features, image_activations)) != 1:
            raise ValueError(
                "encode_image needs exactly one of image=, image_features= or image_activations="
            )
        if image_activations is not None:  # the unlocked top layers, pooling and head of the tower
            image_features = self.vision.split_at(self.vision.unlocked_layers).top(image_activations)
        elif image_features is None:
            image_features = self.vision(image)
        elif self.training and any(p.requires_grad for p in self.vision.parameters()):
            raise ValueError(
                f"cached image_features bypass the vision tower {self.vision.spec}, which has trainable "
                "parameters; cache only a fully locked tower (locked=true, unlocked_layers=0)"
            )
        x = self.vision_proj(image_features)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: Tensor, normalize: bool = True) -> Tensor:
        """Token ids (B, L) -> embeddings (B, D)."""
        x = self.text_proj(self.text(text))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Batch dict with "image", "image_features" or "image_activations", and "text" -> embeddings
        + temperature."""
        out = {
            "image_emb": self.encode_image(
                image=batch.get("image"),
                image_features=batch.get("image_features"),
                image_activations=batch.get("image_activations"),
            ),
            "text_emb": self.encode_text(batch["text"]),
            "logit_scale": self.logit_scale.clamp(max=self.max_logit_scale).exp(),  # scalar 1/T
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    # ------------------------------------------------------------------ data side
    def image_transform(self, train: bool) -> Callable[[Any], Tensor]:
        return self.vision.transform(train)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.text.tokenize(texts)

    @property
    def image_features_cacheable(self) -> bool:
        """True when the vision tower is fully locked and trains on its deterministic eval transform."""
        v = self.vision
        frozen = not any(p.requires_grad for p in v.parameters())
        return bool(v.locked and frozen and v.deterministic_transform)

    def locked_state(self) -> dict[str, dict[str, Any]]:
        """Per tower: locked?, unlocked layers, trainable / total parameter counts (for logs)."""
        state = {}
        for name, tower in (("vision", self.vision), ("text", self.text)):
            params = list(tower.parameters())
            state[name] = {
                "spec": tower.spec,
                "locked": tower.locked,
                "unlocked_layers": tower.unlocked_layers,
                "layers": len(tower.layers()),
                "trainable_params": sum(p.numel() for p in params if p.requires_grad),
                "params": sum(p.numel() for p in params),
            }
        return state


def build_model(cfg: ModelConfig) -> DualEncoder:
    """Towers (locked as configured), projections and temperature from ``cfg``.

    With ``cfg.init`` the towers and heads are those of a pretrained model (``clipkit.models.init``).
    """
    if cfg.init:
        from clipkit.models.init import resolve_init

        cfg = resolve_init(cfg)
    vision, text = build_towers(cfg.vision, cfg.text)
    return DualEncoder(
        vision,
        text,
        embed_dim=cfg.embed_dim,
        projection=cfg.projection,
        init_logit_scale=cfg.init_logit_scale,
        max_logit_scale=cfg.max_logit_scale,
        init_logit_bias=cfg.init_logit_bias,
    )
