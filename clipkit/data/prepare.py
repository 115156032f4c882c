"""Raw samples -> prepared samples: caption, idx, and the image decoded and transformed (or
the cached locked-tower features looked up), ready for ``clipkit.data.collate``."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from clipkit.config import DataConfig
from clipkit.data.augment import draw_view
from clipkit.data.decode import SampleError, decode_caption, decode_image, parse_idx
from clipkit.data.fast_transform import FastImage, draft_size_of, plan_fast_image
from clipkit.data.skips import SkipCounter


class FeatureLookup(Protocol):
    """``key in lookup``, ``lookup.get(key)``; a lookup with ``views`` > 1 (an attribute) holds
    that many views per key, ``lookup.get(key, view)`` (``clipkit.data.augment``)."""

    def __contains__(self, key: str) -> bool: ...
    def get(self, key: str) -> np.ndarray: ...


def lookup_key(lookup: FeatureLookup) -> str:
    """The batch key a lookup's rows go under: ``"image_features"`` (pooled tower outputs), or
    what the lookup names in ``batch_key`` (``"image_activations"``: the partial feature cache)."""
    return str(getattr(lookup, "batch_key", "image_features"))


class SamplePreparer:
    """Prepares the samples of one loader: ``want`` (the tar member extensions to read),
    ``prepare(raw)`` and ``prepared(raws, skips, ...)``.

    A transform of the usual torchvision shape runs as the equivalent, faster plan of
    ``fast_transform.py`` (``fast``: its uint8 images are finished per batch by collation); one
    with ``wants_key`` is called as ``transform(image, key)``. ``view_seed`` = (seed, epoch) of
    a training loader: a lookup with several views serves the one ``draw_view`` picks per sample
    (without it, view 0: the eval view).
    """

    def __init__(
        self,
        cfg: DataConfig,
        image_transform: Callable[[Image.Image], torch.Tensor] | None,
        feature_lookup: FeatureLookup | None,
        view_seed: tuple[int, int] | None = None,
    ):
        self.cfg, self.image_transform, self.feature_lookup = cfg, image_transform, feature_lookup
        self.view_seed = view_seed
        self.views = int(getattr(feature_lookup, "views", 1))
        self.image_exts = [e.strip().lower() for e in cfg.image_keys.split(";") if e.strip()]
        self.draft_size = draft_size_of(image_transform)
        self.fast: FastImage | None = None
        if image_transform is not None and feature_lookup is None:
            self.fast = plan_fast_image(image_transform)
        wanted = {cfg.caption_key, "idx"} | (set() if feature_lookup is not None else set(self.image_exts))
        self.want: Callable[[str], bool] = wanted.__contains__

    @property
    def random(self) -> bool:
        """Whether preparing draws random numbers (an image transform runs per sample)."""
        return self.image_transform is not None and self.feature_lookup is None

    def prepare(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raw members -> {"key", "idx", "caption", "image" | "image_features" | "image_activations"};
        may raise SampleError."""
        key = raw["__key__"]
        out = {"key": key, "caption": decode_caption(raw.get(self.cfg.caption_key))}
        out["idx"] = parse_idx(raw.get("idx"))
        if self.feature_lookup is not None:
            if key not in self.feature_lookup:
                raise SampleError("missing_feature", f"no cached feature for key '{key}'")
            rows = self.lookup(key, raw.get("__draw__"))
            out[lookup_key(self.feature_lookup)] = np.asarray(rows, dtype=np.float32)
            return out
        data = next((raw[e] for e in self.image_exts if e in raw), None)
        if self.fast is not None:
            out["image"] = self.fast.load(data)  # (H, W, 3) uint8; to float per batch in collate
            return out
        img = decode_image(data, draft_size=self.draft_size)
        if getattr(self.image_transform, "wants_key", False):  # e.g. the feature cache's ViewStack
            out["image"] = self.image_transform(img, key)
        else:
            out["image"] = self.image_transform(img)  # (3, H, W); transform bugs are not data errors
        return out

    def lookup(self, key: str, draw: Any) -> np.ndarray:
        """The cached rows of ``key``: with several views, one drawn from (seed, epoch, key,
        ``draw``) in training, view 0 otherwise."""
        lookup: Any = self.feature_lookup
        if self.views <= 1:
            return lookup.get(key)
        view = 0 if self.view_seed is None else draw_view(*self.view_seed, key, draw, self.views)
        return lookup.get(key, view)

    def prepared(
        self, raws: Iterable[dict[str, Any]], skips: SkipCounter, seed: tuple[int, int] | None = None
    ) -> Iterator[dict[str, Any]]:
        """The usable samples of ``raws``; the others go to ``skips``. With ``seed`` = (seed,
        epoch), torch's RNG is seeded per sample (and put back after), so a sample's random crop
        depends on the sample alone, not on what was decoded before it: a resumed stream that
        skips samples undecoded stays exact."""
        seeded = seed is not None and self.random
        gen = torch.default_generator  # (torch.manual_seed would also seed every GPU: 25x slower)
        for raw in raws:
            try:
                if seeded:
                    saved = gen.get_state()
                    shard = zlib.crc32(raw["__url__"].encode())  # str hash() differs per process
                    # A resampled shard read again gets new crops: its draw (ints) joins the seed.
                    draw = raw.get("__draw__", ())
                    gen.manual_seed(hash((*seed, shard, raw["__pos__"][1], *draw)) & (2**63 - 1))
                    try:
                        out = self.prepare(raw)
                    finally:
                        gen.set_state(saved)
                else:
                    out = self.prepare(raw)
            except SampleError as err:
                skips.bad_sample(raw["__url__"], raw["__key__"], err)
                continue
            if "__draw__" in raw:  # resampled (clipkit.data.resample): for the batch's "source"
                out["source"], out["draw"] = raw["__src__"], raw["__draw__"]
            yield out  # after the RNG is put back: the consumer's own draws are not undone
