"""Distillation from a trained teacher: KL on its similarity distribution (OpenCLIP) and DCLIP's hybrid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.errors import ClipkitError
from clipkit.losses.base import LOSSES, need, pair, upcast
from clipkit.losses.gather import all_gather_cat, gather_features

MODEL_INPUTS = ("image", "image_features", "text")
PROBE_TEXTS = ["a photo of a dog", "two red cars on a street at night, seen from above"]


def load_teacher(teacher: str | Path | nn.Module | None) -> nn.Module | None:
    """A frozen, eval-mode teacher: a module as given, or a model spec (``clipkit.models.specs``)
    naming a clipkit DualEncoder: a run folder, a checkpoint, a recipe or a module:function."""
    if teacher is None:
        return None
    if isinstance(teacher, (str, Path)):
        teacher = _teacher_from_spec(str(teacher))
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a run folder, a checkpoint file or an nn.Module, got {teacher!r}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def _teacher_from_spec(spec: str) -> nn.Module:
    from clipkit.models.specs import dual_encoder_of, load_model, spec_kind

    model = load_model(spec)
    dual = dual_encoder_of(model)
    if dual is None:
        raise ClipkitError(
            f"distillation teacher '{spec}' is a {spec_kind(spec)} model, not a clipkit DualEncoder: the "
            "teacher embeds the student's batch (its image tensors and token ids) and returns the "
            "DualEncoder's outputs, so give a run folder, a checkpoint, a recipe .yaml or a "
            "module:function returning a DualEncoder"
        )
    return dual


class TeacherLoss(nn.Module):
    """The teacher's handling shared by ``distill_kl`` and ``dclip``.

    ``teacher``: a model spec naming a clipkit DualEncoder (``clipkit.models.specs``: a run
    folder, a checkpoint, a recipe or a module:function),
    an in-memory module with the DualEncoder contract, or ``None``, in which case the
    teacher's outputs must come in ``out["teacher_image_emb"], out["teacher_text_emb"]``
    (and ``out["teacher_logit_scale"]`` for ``distill_kl``). The teacher embeds the same
    batch as the student (its ``image`` or cached ``image_features``, and ``text`` tokens),
    in eval mode, without gradient; it is not part of the state_dict (checkpoints stay small)
    nor of the optimizer, and follows the batch's device.
    """

    def __init__(self, teacher: str | Path | nn.Module | None):
        super().__init__()
        object.__setattr__(self, "teacher", load_teacher(teacher))  # not a submodule: not saved
        self.teacher_reads_cached_features = True

    def attach(self, model: nn.Module) -> None:
        """Check that the teacher reads the student's inputs (the training loop calls this):
        same tokens for probe captions, same eval image transform; and whether it can read the
        student's cached image features (only if its vision tower is the same)."""
        from clipkit.models.dual_encoder import DualEncoder

        t = self.teacher
        if not (isinstance(t, DualEncoder) and isinstance(model, DualEncoder)):
            return
        name = self.registry_name
        a, b = model.tokenize(PROBE_TEXTS), t.tokenize(PROBE_TEXTS)
        if a.shape != b.shape or not torch.equal(a, b):
            raise ClipkitError(
                f"loss '{name}': the teacher's tokenizer ({t.text.spec}) gives other token ids than the "
                f"student's ({model.text.spec}); the teacher embeds the student's batch, so both need the "
                "same text tower tokenizer and model.text.context_length"
            )
        from PIL import Image

        probe = Image.new("RGB", (64, 48), (200, 30, 90))
        pa, pb = model.image_transform(train=False)(probe), t.image_transform(train=False)(probe)
        if pa.shape != pb.shape or not torch.allclose(pa, pb):
            raise ClipkitError(
                f"loss '{name}': the teacher's image transform ({t.vision.spec}) differs from the student's "
                f"({model.vision.spec}): both need the same model.vision.image_size and normalisation"
            )
        self.teacher_reads_cached_features = t.vision.fingerprint() == model.vision.fingerprint()

    @torch.no_grad()
    def teacher_out(self, out: dict[str, Any], batch: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        name = self.registry_name
        if self.teacher is None:
            hint = "Pass loss.args.teacher=<run folder or checkpoint>, or put the teacher's outputs in out."
            return {
                "image_emb": need(out, "teacher_image_emb", name, "out", hint).detach(),
                "text_emb": need(out, "teacher_text_emb", name, "out", hint).detach(),
                "logit_scale": out.get("teacher_logit_scale"),
            }
        if batch is None:
            raise KeyError(f"loss '{name}' needs the batch: its teacher embeds the student's inputs")
        if batch.get("image_activations") is not None:
            raise ClipkitError(
                f"loss '{name}': the batch carries the partial feature cache's activations, which only the "
                "student's vision tower reads; train with train.feature_cache=false"
            )
        if batch.get("image_features") is not None and not self.teacher_reads_cached_features:
            raise ClipkitError(
                f"loss '{name}': the batch carries cached features of the student's locked vision tower, "
                "but the teacher's vision tower is another one; train with train.feature_cache=false"
            )
        device = out["image_emb"].device
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != device:
            self.teacher.to(device)
        self.teacher.eval()
        return self.teacher({k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None})


@LOSSES.register("distill_kl")
class DistillKlLoss(TeacherLoss):
    """CLIP loss plus distillation of the teacher's similarity distribution, as OpenCLIP's
    ``DistillClipLoss`` (Radford et al., 2021, CLIP; OpenCLIP's distillation, after Hinton
    et al., 2015, "Distilling the Knowledge in a Neural Network").

    With student logits ``z = s x @ y.T`` and teacher logits ``t = s_T x_T @ y_T.T`` over the
    global batch of N (each with its own ``logit_scale``)::

        L_distill = 1/2 [ -1/N sum_i sum_j softmax(t)_ij log softmax(z)_ij      (rows: i2t)
                          -1/N sum_j sum_i softmax(t.T)_ji log softmax(z.T)_ji ] (rows: t2i)
        L = contrastive_weight * L_clip + distill_weight * L_distill

    ``L_distill`` is the cross-entropy of the row distributions, i.e. ``KL(teacher || student)``
    plus the teacher's entropy, a constant (same gradient); the part ``kl`` reports the KL
    itself. With both weights 1 this equals the sum of OpenCLIP's two losses. Teacher: see
    ``TeacherLoss`` (``loss.args.teacher=<run folder or checkpoint>``; any embedding width).
    """

    def __init__(
        self,
        teacher: str | Path | nn.Module | None,
        contrastive_weight: float = 1.0,
        distill_weight: float = 1.0,
    ):
        super().__init__(teacher)
        self.contrastive_weight, self.distill_weight = contrastive_weight, distill_weight

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "distill_kl")
        t_out = self.teacher_out(out, batch)
        if t_out.get("logit_scale") is None:
            raise KeyError("loss 'distill_kl' needs the teacher's logit_scale (out['teacher_logit_scale'])")
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D)
        tx = all_gather_cat(upcast(t_out["image_emb"]).to(x.dtype), with_grad=False)  # (N, D_T)
        ty = all_gather_cat(upcast(t_out["text_emb"]).to(x.dtype), with_grad=False)
        z = scale * x @ y.T  # (N, N)
        t = t_out["logit_scale"].detach().to(x.dtype) * tx @ ty.T  # (N, N), constant
        labels = torch.arange(x.shape[0], device=x.device)
        loss_clip = (F.cross_entropy(z, labels) + F.cross_entropy(z.T, labels)) / 2
        distill, kl = [], []
        for zs, ts in ((z, t), (z.T, t.T)):
            pt, log_pt = ts.softmax(dim=1), ts.log_softmax(dim=1)
            xent = -(pt * zs.log_softmax(dim=1)).sum(dim=1).mean()
            distill.append(xent)
            kl.append(xent + (pt * log_pt).sum(dim=1).mean())
        loss_distill = (distill[0] + distill[1]) / 2
        loss = self.contrastive_weight * loss_clip + self.distill_weight * loss_distill
        return {
            "loss": loss,
            "loss_clip": loss_clip,
            "loss_distill": loss_distill,
            "kl": (kl[0] + kl[1]).detach() / 2,
        }


@LOSSES.register("dclip")
class DclipLoss(TeacherLoss):
    """Contrastive loss plus cosine distance to the teacher's embeddings (Csizmadia et al.,
    2025, "Distill CLIP (DCLIP): Enhancing Image-Text Retrieval via Cross-Modal Transformer
    Distillation", the student's hybrid loss).

    With the student's ``(x_i, y_i)`` and the teacher's ``(u_i, v_i)`` for the same batch::

        L_cos = 1/N sum_i [ (1 - cos(x_i, u_i)) + (1 - cos(y_i, v_i)) ] / 2
        L     = L_clip + weight * L_cos

    The cosine term compares embeddings directly, so the teacher's width must equal the
    student's ``model.embed_dim`` (no learned projection: it would let the student match a
    projection of the teacher instead of the teacher; a mismatch raises). In DCLIP the
    teacher is a cross-attention transformer over region features; here it is any clipkit
    dual encoder (``TeacherLoss``), whose embeddings play the role of its enriched ones.
    """

    def __init__(self, teacher: str | Path | nn.Module | None, weight: float = 1.0):
        super().__init__(teacher)
        self.weight = weight

    def forward(self, out: dict[str, Any], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        img, txt, scale = pair(out, "dclip")
        t_out = self.teacher_out(out, batch)
        u, v = t_out["image_emb"], t_out["text_emb"]
        if u.shape != img.shape or v.shape != txt.shape:
            raise ValueError(
                f"loss 'dclip': teacher embeddings {tuple(u.shape)} / {tuple(v.shape)} must have the student's "
                f"shape {tuple(img.shape)}: set model.embed_dim to the teacher's width"
            )
        x, y = gather_features(upcast(img), upcast(txt))  # (N, D)
        u = all_gather_cat(upcast(u).to(x.dtype), with_grad=False)
        v = all_gather_cat(upcast(v).to(x.dtype), with_grad=False)
        logits = scale * x @ y.T
        labels = torch.arange(x.shape[0], device=x.device)
        loss_clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        cos_img = F.cosine_similarity(x, u, dim=-1)  # (N,)
        cos_txt = F.cosine_similarity(y, v, dim=-1)
        loss_cos = ((1 - cos_img).mean() + (1 - cos_txt).mean()) / 2
        return {"loss": loss_clip + self.weight * loss_cos, "loss_clip": loss_clip, "loss_cos": loss_cos}
