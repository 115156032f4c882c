"""The public Python API: what a notebook needs, in four names.

    model = clipkit.load("runs/lit_emoji")             # any --model spec the CLI takes
    emb = model.encode_image([pil_image])              # (N, D) unit-norm float32
    clf = clipkit.zeroshot_classifier(model, ["cat", "dog"], ["a photo of a {c}."])
    run_dir = clipkit.train("train/lit_emoji.yaml", ["train.samples=2000"])
    hits = clipkit.Index.load("indexes/emoji").search("a red heart", k=5)

Everything else in the package is private by convention: its names may change between
releases. Each function here is a thin layer over the modules the CLI uses, so the Python API
and the commands give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipkit.config import Config, from_dict, load_config, merge, parse_overrides, to_dict
from clipkit.errors import ClipkitError

__all__ = ["Index", "Model", "ZeroShotClassifier", "load", "train", "zeroshot_classifier"]


class ApiError(ClipkitError, TypeError):
    """An argument of the wrong kind given to the Python API."""


def _as_images(images: Any) -> list[Image.Image]:
    if isinstance(images, (Image.Image, str, Path)):
        images = [images]
    out = []
    for i, im in enumerate(images):
        if isinstance(im, (str, Path)):
            im = Image.open(im)
        if not isinstance(im, Image.Image):
            raise ApiError(f"image {i} is a {type(im).__name__}; give PIL images, image paths or a tensor")
        out.append(im.convert("RGB") if im.mode != "RGB" else im)
    return out


class Model:
    """A loaded dual encoder: PIL images and strings in, L2-normalised embeddings out.

    ``inner`` is the underlying model (``clipkit.models.adapters.EvalModel``, a torch module);
    ``preprocess`` is its evaluation image transform (PIL image -> (3, H, W) tensor), the one
    ``clipkit eval`` uses; ``tokenize`` turns strings into the text tower's token ids.
    """

    def __init__(self, inner: Any, batch_size: int = 64):
        self.inner, self.batch_size = inner, batch_size
        self.spec, self.name = inner.spec, inner.name
        self.resolved = getattr(inner, "resolved", inner.spec)  # the spec that reloads exactly this model
        self.preprocess = inner.image_transform(False)
        self.tokenize = inner.tokenize

    def __repr__(self) -> str:
        return f"clipkit.Model({self.resolved!r})"

    @torch.inference_mode()
    def encode_image(self, images: Any) -> torch.Tensor:
        """(N, D) float32 embeddings of a PIL image, an image path, a list of those, or a
        preprocessed (N, 3, H, W) / (3, H, W) tensor."""
        from clipkit.models.embed import encode_images, eval_mode, model_device

        if isinstance(images, torch.Tensor):
            batches = [images.unsqueeze(0) if images.dim() == 3 else images]
        else:
            pil = _as_images(images)
            batches = [
                torch.stack([self.preprocess(im) for im in pil[s : s + self.batch_size]])
                for s in range(0, len(pil), self.batch_size)
            ]
        with eval_mode(self.inner):
            device = model_device(self.inner)
            return torch.cat([encode_images(self.inner, b, device).float().cpu() for b in batches])

    @torch.inference_mode()
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(N, D) float32 embeddings of a string or a list of strings."""
        from clipkit.models.embed import encode_texts, eval_mode, model_device

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ApiError("encode_text takes a string or a list of strings")
        with eval_mode(self.inner):
            device = model_device(self.inner)
            parts = [
                encode_texts(self.inner, texts[s : s + self.batch_size], device).float().cpu()
                for s in range(0, len(texts), self.batch_size)
            ]
        return torch.cat(parts) if parts else torch.empty(0, 0)


def load(spec: str, device: str | torch.device = "cpu", overrides: Sequence[str] = ()) -> Model:
    """Load any model spec the CLI's ``--model`` takes: a run folder or checkpoint,
    ``open_clip:<config>[@weights]``, ``hf-clip:<dir>``, a recipe ``.yaml`` (with ``overrides``)
    or ``module:function``. Nothing is downloaded."""
    from clipkit.models.specs import load_model

    return Model(load_model(spec, list(overrides), device))


class ZeroShotClassifier:
    """Class weights from class names x prompt templates, as CLIP_benchmark builds them.

    ``weights`` is (C, D), unit-norm rows in ``classnames`` order. ``logits(images)`` is
    (N, C) = 100 * image_emb @ weights.T (CLIP_benchmark's scale); ``probs`` its softmax;
    ``predict`` the best class name per image.
    """

    def __init__(self, model: Model, classnames: list[str], weights: torch.Tensor):
        self.model, self.classnames, self.weights = model, classnames, weights

    def logits(self, images: Any) -> torch.Tensor:
        from clipkit.evaluation.zeroshot import LOGIT_SCALE

        return LOGIT_SCALE * self.model.encode_image(images) @ self.weights.T

    def probs(self, images: Any) -> torch.Tensor:
        return self.logits(images).softmax(dim=-1)

    __call__ = probs

    def predict(self, images: Any) -> list[str]:
        return [self.classnames[i] for i in self.logits(images).argmax(dim=-1).tolist()]


def zeroshot_classifier(
    model: Model, classnames: Sequence[str], templates: Sequence[str] | dict[str, list[str]]
) -> ZeroShotClassifier:
    """Templates hold ``{c}`` for the class name (``"a photo of a {c}."``), or are a dict of
    class-specific prompts (CuPL style), exactly as ``clipkit eval zeroshot`` reads them."""
    from clipkit.evaluation.zeroshot import build_classifier

    if not isinstance(model, Model):
        raise ApiError("zeroshot_classifier takes a model from clipkit.load(...)")
    names = list(classnames)
    tmpl = templates if isinstance(templates, dict) else list(templates)
    return ZeroShotClassifier(model, names, build_classifier(model.inner, names, tmpl).float())


def train(config: Config | str | Path | dict, overrides: Sequence[str] = ()) -> Path:
    """Train from a recipe path, a config dict or a ``Config`` (plus dotted ``overrides``,
    e.g. ``["train.samples=2000"]``), as ``clipkit train`` does; returns the run folder."""
    from clipkit.training.loop import train as train_loop

    if isinstance(config, (str, Path)):
        cfg = load_config(config, list(overrides))
    elif isinstance(config, dict):
        cfg = from_dict(Config, merge(config, parse_overrides(list(overrides))))
    elif isinstance(config, Config):
        cfg = from_dict(Config, merge(to_dict(config), parse_overrides(list(overrides))))
    else:
        raise ApiError(f"train takes a recipe path, a dict or a Config, not {type(config).__name__}")
    return train_loop(cfg)


class Index:
    """A built index folder (``clipkit index build``), searched by text, image or vector.

    The query model is the one the index records (loaded on first use), or ``model`` (a spec or
    a ``Model``) given to ``Index.load``.
    """

    def __init__(self, index: Any, model: Model | str | None = None):
        self._index, self._model = index, model

    @classmethod
    def load(cls, folder: str | Path, model: Model | str | None = None) -> Index:
        from clipkit.index.search import SearchIndex

        return cls(SearchIndex(folder), model)

    def __len__(self) -> int:
        return self._index.ntotal

    @property
    def dim(self) -> int:
        return self._index.dim

    @property
    def model(self) -> Model:
        if not isinstance(self._model, Model):
            from clipkit.index.query import query_model

            self._model = Model(query_model(self._index, self._model or ""))
        return self._model

    def search(self, queries: Any, k: int = 10) -> list:
        """Rows (``key``, metadata, ``score``) of the k nearest items.

        One query (a string, a PIL image, an image ``Path`` or a (D,) vector) gives a list of
        rows; a list of queries or a (Q, D) array gives one list of rows per query.
        """
        single = isinstance(queries, (str, Path, Image.Image)) or (
            isinstance(queries, (np.ndarray, torch.Tensor)) and queries.ndim == 1
        )
        batch = [queries] if single and not isinstance(queries, (np.ndarray, torch.Tensor)) else queries
        if isinstance(batch, (np.ndarray, torch.Tensor)):
            vectors = np.asarray(batch, dtype=np.float32).reshape(-1, self.dim)
        else:
            vectors = (
                np.concatenate([self._embed(q) for q in batch]) if len(batch) else np.empty((0, self.dim))
            )
        rows = self._index.search(vectors, k) if len(vectors) else []
        return rows[0] if single else rows

    def _embed(self, query: Any) -> np.ndarray:
        if isinstance(query, str):
            return self.model.encode_text([query]).numpy()
        if isinstance(query, (Path, Image.Image)):
            return self.model.encode_image(query).numpy()
        return np.asarray(query, dtype=np.float32).reshape(1, self.dim)
