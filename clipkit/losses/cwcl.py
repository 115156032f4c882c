"""CWCL: contrastive loss with continuous soft targets from a locked pretrained tower."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.losses.base import LOSSES, pair, upcast
from clipkit.losses.gather import all_gather_cat, gather_features


@LOSSES.register("cwcl")
class CwclLoss(nn.Module):
    """Continuously weighted contrastive loss (Srinivasa et al., 2023, "CWCL: Cross-Modal
    Transfer with Continuously Weighted Contrastive Loss").

    The locked, pretrained tower's features ``u`` (of modality ``targets_from``) give
    soft targets: every pair (i, j) is a positive to the degree ``u_i`` and ``u_j`` agree.
    With ``z_ij = s x_i.y_j`` over the global batch of N pairs::

        w_ij  = cos(u_i, u_j) / 2 + 1/2                      (in [0, 1], w_ii = 1)
        L_i2t = -1/N sum_i sum_j w_ij / (sum_k w_ik) log softmax_j(z_ij)
        L_t2i = the same on z.T (w is symmetric);   L = (L_i2t + L_t2i) / 2

    Needs ``out["image_emb"], out["text_emb"], out["logit_scale"]`` and the locked
    tower's pooled features (before any projection, any width, no gradient):
    ``out["image_tower_features"]`` (``targets_from="image"``, LiT's locked image tower;
    when absent, ``batch["image_features"]``, the feature cache's outputs of that tower,
    is used) or ``out["text_tower_features"]`` (``targets_from="text"``).
    Tiled (memory O(N (D + F))): ``cwcl_tiled``.

    ``center=True`` (not in the paper; off by default) subtracts the global batch's mean
    feature before the cosine. Pooled features after a ReLU-family activation (CNN trunks
    such as EfficientNet) are all non-negative, so any two images have cos ~0.8 and every
    ``w_ij`` sits near 0.9: the targets are nearly uniform and the loss pulls every pair
    together (on the demo's LiT setup retrieval R@1 fell to ~0.005). Centring restores the
    spread the formula assumes.
    """

    def __init__(self, targets_from: str = "image", center: bool = False):
        super().__init__()
        if targets_from not in ("image", "text"):
            raise ValueError(f"loss 'cwcl': targets_from must be 'image' or 'text', got {targets_from!r}")
        self.targets_from, self.center = targets_from, center

    def tower_features(self, out: dict[str, Any], batch: dict[str, Any] | None) -> torch.Tensor:
        key = f"{self.targets_from}_tower_features"
        if out.get(key) is not None:
            return out[key]
        if self.targets_from == "image" and batch is not None and batch.get("image_features") is not None:
            return batch["image_features"]
        cached = " or batch['image_features'] (feature cache)" if self.targets_from == "image" else ""
        raise KeyError(
            f"loss 'cwcl' needs out['{key}']{cached}: the locked {self.targets_from} tower's pooled "
            f"features, which give its soft targets; out has: {', '.join(sorted(out))}. Lock that tower "
            f"(model.{'vision' if self.targets_from == 'image' else 'text'}.locked=true) and return its "
            f"Tower.forward output from DualEncoder.forward as out['{key}'], or set "
            f"loss.args.targets_from to the other tower."
        )

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "cwcl")
        feats = self.tower_features(out, batch).detach()
        if feats.dim() != 2 or feats.shape[0] != img.shape[0]:
            raise ValueError(
                f"loss 'cwcl': tower features {tuple(feats.shape)} must be (B={img.shape[0]}, F)"
            )
        all_img, all_txt = gather_features(upcast(img), upcast(txt))  # (N, D)
        u = all_gather_cat(feats, with_grad=False).to(all_img.dtype)  # (N, F)
        if self.center:
            u = u - u.mean(dim=0, keepdim=True)
        u = F.normalize(u, dim=-1)
        w = u @ u.T / 2 + 0.5  # (N, N) intra-modal similarity of the locked tower, in [0, 1]
        targets = w / w.sum(dim=1, keepdim=True)
        logits = scale * all_img @ all_txt.T  # (N, N)
        loss_i2t = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
        loss_t2i = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}
