"""Hard-negative batches (Sample4Geo): neighbours in the current embedding space share a batch.

Deuser et al., 2023, "Sample4Geo: Hard Negative Sampling For Cross-View Geo-Localisation".
With ``data.hard_negatives.k > 0`` the training stream's passes after the first are composed
here instead of read in shuffled shard order:

1. at a pass boundary (and before the first pass with ``from_start``), when ``data.hard_negatives.every_samples`` samples have gone by since
   the last mining (0: at every boundary), the current model embeds the whole training set
   (eval mode, eval transform; from the feature cache's image features when the run has one);
2. FAISS (exact inner product) finds the ``k`` nearest texts of every image, itself excluded:
   the captions the model confuses with that image, i.e. its hardest negatives;
3. ``compose_batches``: in a random order (the pass seed), take an unvisited sample, add its
   unvisited neighbours until the global batch (``batch_size * world_size``) is full, and
   repeat; every sample is in one batch per pass (the ``N mod batch`` left at the end are
   left out of that pass, like the short batch of an ordinary pass);
4. ``NeighbourBatches`` reads each batch's samples straight from the shards: ``index_shards``
   maps every ``idx`` (the shard's ``idx`` member, required and unique) to (shard, byte
   offset of the sample's first tar header); rank r takes rows ``[r B, (r + 1) B)`` of every
   global batch. Decoding, transforms, caption augmentation and collation are the
   pipeline's (``ShardDataset``), so batches have the usual keys.

Between minings a pass reuses the last neighbours with a fresh random order. Local,
uncompressed tar shards only (byte offsets). A resumed run mines again at its first pass
boundary (or at once, when it resumes past the first pass); such a pass starts over.
"""

from __future__ import annotations

import contextlib
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.config import DataConfig
from clipkit.data.collate import skip_carrier
from clipkit.data.decode import SampleError, parse_idx
from clipkit.data.pipeline import ShardDataset, build_loader, identity, worker_init_fn
from clipkit.data.skips import DataError
from clipkit.data.tario import DuplicateMember, TarDamaged, iter_tar, split_name
from clipkit.data.urls import _local_path, expand_urls, is_local

GZIP_MAGIC = b"\x1f\x8b"


# ---------------------------------------------------------------------------- idx -> shard, offset


@dataclass
class ShardIndex:
    """Where each sample is: ``where[idx] = (shard number in urls, byte offset of its first header)``."""

    urls: list[str]
    where: dict[int, tuple[int, int]]

    def __len__(self) -> int:
        return len(self.where)


def index_shards(urls: list[str]) -> ShardIndex:
    """Read every shard's tar headers and ``idx`` members (nothing else) into a ``ShardIndex``."""
    where: dict[int, tuple[int, int]] = {}
    for s, url in enumerate(urls):
        if not is_local(url):
            raise DataError(
                f"hard-negative batches read samples by byte offset: '{url}' is not a local shard"
            )
        with open(_local_path(url), "rb") as f:
            if f.read(2) == GZIP_MAGIC:
                raise DataError(f"hard-negative batches need uncompressed tar shards; '{url}' is gzipped")
            f.seek(0)
            start, key, sample_start, idx = 0, None, 0, None
            try:
                for name, data in iter_tar(f, lambda n: n.endswith(".idx")):
                    parts = split_name(name)
                    if parts is not None and parts[0] != key:  # a new sample: its headers began at `start`
                        _add(where, idx, key, url, s, sample_start)
                        key, sample_start, idx = parts[0], start, None
                    if parts is not None and parts[1] == "idx":
                        idx = parse_idx(data)
                    start = f.tell()  # the next member's headers begin here
            except (TarDamaged, SampleError) as err:
                raise DataError(f"shard '{url}' cannot be indexed for hard-negative batches: {err}") from err
            _add(where, idx, key, url, s, sample_start)
    return ShardIndex(list(urls), where)


def _add(
    where: dict[int, tuple[int, int]], idx: int | None, key: str | None, url: str, s: int, at: int
) -> None:
    if key is None:
        return
    if idx is None or idx < 0:
        raise DataError(
            f"sample '{key}' of shard '{url}' has no idx member; hard-negative batches find samples by "
            "idx: write shards with per-sample indices (clipkit data build does)"
        )
    if idx in where:
        raise DataError(f"idx {idx} appears twice (again in sample '{key}' of '{url}'); idx must be unique")
    where[idx] = (s, at)


def read_one(stream: Any, want: Callable[[str], bool]) -> dict[str, Any] | DuplicateMember:
    """The sample whose first header is at the stream's position: ``{"__key__", ext: bytes}`` for
    the extensions ``want`` accepts. Stops at the next sample's first header (its data unread)."""
    key, sample = None, {}

    def wanted(name: str) -> bool:
        nonlocal key
        parts = split_name(name)
        if parts is None:
            return False
        key = parts[0] if key is None else key
        return parts[0] == key and want(parts[1])

    for name, data in iter_tar(stream, wanted):
        parts = split_name(name)
        if parts is None:
            continue
        if parts[0] != key:
            break
        if want(parts[1]):
            if parts[1] in sample:
                return DuplicateMember(f"member '{key}.{parts[1]}' appears twice")
            sample[parts[1]] = data
    if key is None:
        raise EOFError("no tar member at this offset")
    return {"__key__": key, **sample}


def read_samples(index: ShardIndex, ids: list[int], want: Callable[[str], bool]) -> dict[int, Any]:
    """``{idx: raw sample dict (or the exception that spoiled it)}``, each shard opened once."""
    by_shard: dict[int, list[int]] = defaultdict(list)
    for i in ids:
        by_shard[index.where[i][0]].append(i)
    found: dict[int, Any] = {}
    for s, members in by_shard.items():
        url = index.urls[s]
        with open(_local_path(url), "rb") as f:
            for i in members:
                f.seek(index.where[i][1])
                try:
                    sample = read_one(f, want)
                except (TarDamaged, OSError, EOFError) as err:
                    sample = SampleError("unreadable_shard", f"cannot read idx {i} of '{url}': {err!r}")
                if isinstance(sample, dict):
                    sample["__url__"] = url  # type: ignore[assignment]
                found[i] = sample
    return found


# ---------------------------------------------------------------------------- neighbours and batches


def nearest_neighbours(image_emb: np.ndarray, text_emb: np.ndarray, k: int) -> np.ndarray:
    """(N, k) positions of the k texts with the highest ``image_i . text_j``, best first.

    Left out: j = i, and every j whose text embedding equals text i's (the same caption on
    another image, e.g. a second view): such a text is a positive for image i, not a negative,
    and a batch holding both would teach the model to push a true pair apart.
    """
    import faiss

    n = image_emb.shape[0]
    text = np.ascontiguousarray(text_emb, dtype=np.float32)
    _, group = np.unique(text, axis=0, return_inverse=True)  # equal rows -> equal group
    group = group.reshape(-1)
    largest = int(np.bincount(group).max())
    if not 1 <= k <= n - largest:
        raise ValueError(
            f"data.hard_negatives.k must be in [1, {n - largest}] for {n} samples "
            f"({largest} share one caption), got {k}"
        )
    index = faiss.IndexFlatIP(text.shape[1])
    index.add(text)
    _, found = index.search(np.ascontiguousarray(image_emb, dtype=np.float32), k + largest)  # (N, k + g)
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        row = [j for j in found[i] if j >= 0 and group[j] != group[i]]
        out[i] = row[:k]
    return out


def compose_batches(neighbours: np.ndarray, group: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Greedy Sample4Geo batches of ``group`` positions; each position in at most one batch.

    In a random order: an unvisited sample opens (or joins) the current batch, then its
    unvisited neighbours (best first) join until the batch is full.
    """
    n = neighbours.shape[0]
    used = np.zeros(n, dtype=bool)
    batches, current = [], []

    def put(p: int) -> bool:  # True when the batch just filled up
        nonlocal current
        used[p] = True
        current.append(p)
        if len(current) == group:
            batches.append(np.array(current, dtype=np.int64))
            current = []
            return True
        return False

    for p in rng.permutation(n):
        if used[p]:
            continue
        if put(int(p)):
            continue
        for q in neighbours[p]:
            if not used[q] and put(int(q)):
                break
    return batches  # the last, incomplete batch is left out


# ---------------------------------------------------------------------------- the loader


class NeighbourBatches(IterableDataset):
    """This rank's batches of a plan (lists of idx), read from the shards; batch j is built by
    loader worker j mod workers, so the DataLoader's round-robin keeps the plan's order."""

    def __init__(self, base: ShardDataset, index: ShardIndex, batches: list[list[int]]):
        self.base, self.index, self.batches = base, index, batches

    def _batch(self, ids: list[int]) -> dict[str, Any]:
        base = self.base
        skips = base.skip_counter()
        raws = read_samples(self.index, ids, base.want)
        seeded = base.train and base.samples.random
        samples = []
        for i in ids:
            raw = raws[i]
            url = self.index.urls[self.index.where[i][0]]
            try:
                if isinstance(raw, DuplicateMember):
                    raise SampleError("duplicate_member", str(raw))
                if isinstance(raw, SampleError):
                    raise raw
                with torch.random.fork_rng(devices=[]) if seeded else contextlib.nullcontext():
                    if seeded:  # a sample's random crop depends on (seed, epoch, idx) alone
                        torch.manual_seed(zlib.crc32(f"{base.seed}/{base.epoch}/{i}".encode()))
                    samples.append(base.prepare(raw))
            except SampleError as err:
                skips.bad_sample(url, str(i), err)
        if not samples:
            return skip_carrier(skips.take())
        return base.collate(samples, skips)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for j in range(worker, len(self.batches), n_workers):
            yield self._batch(self.batches[j])


def plan_loader(
    cfg: DataConfig,
    index: ShardIndex,
    batches: list[list[int]],
    image_transform: Callable | None,
    tokenize: Callable[[list[str]], torch.Tensor],
    *,
    seed: int,
    epoch: int,
    rank: int,
    feature_lookup: Any = None,
) -> DataLoader:
    """A DataLoader over this rank's ``batches`` (lists of idx), with ``.shards`` and ``.readers``."""
    base = ShardDataset(
        index.urls, cfg, image_transform, tokenize, train=True, seed=seed, epoch=epoch, rank=rank,
        feature_lookup=feature_lookup,
    )  # fmt: skip
    workers = min(cfg.workers, len(batches))
    loader = DataLoader(
        NeighbourBatches(base, index, batches),
        batch_size=None,
        num_workers=workers,
        collate_fn=identity,
        worker_init_fn=worker_init_fn(cfg.threads_per_worker, workers),
        pin_memory=torch.cuda.is_available(),
    )
    loader.shards, loader.readers = list(index.urls), max(1, workers)  # type: ignore[attr-defined]
    return loader


# ---------------------------------------------------------------------------- the training stream's side


class HardNegativeSampler:
    """The training stream's loader factory with hard-negative passes (see the module docstring).

    ``model``: the (unwrapped) DualEncoder being trained; ``acc``: the accelerate
    ``Accelerator`` (device, rank, world size); ``feature_lookup``: the run's feature cache or
    None; ``fallback(seed, epoch, ...)``: the ordinary loader factory, used until the first
    mining. Call it as the stream calls its factory: ``sampler(seed, epoch, *rest)``.
    """

    def __init__(
        self, cfg: DataConfig, model: Any, acc: Any, feature_lookup: Any, fallback: Callable[..., Any]
    ):
        self.cfg, self.model, self.acc = cfg, model, acc
        self.feature_lookup, self.fallback = feature_lookup, fallback
        self.k, self.every = cfg.hard_negatives.k, cfg.hard_negatives.every_samples
        self.index = index_shards(expand_urls(cfg.train))
        if not 1 <= self.k < len(self.index) or self.every < 0:
            raise DataError(
                f"data.hard_negatives.k must be in [1, {len(self.index) - 1}] for {len(self.index)} samples "
                f"and every_samples >= 0; got k={self.k}, every_samples={self.every}"
            )
        self.ids: np.ndarray | None = None  # (N,) idx of the mined samples
        self.neighbours: np.ndarray | None = None  # (N, k) positions into ids
        self.since = 0  # samples of the passes opened since the last mining
        self.last_pass = 0
        self.minings = 0
        self.left_out = 0  # samples of the last pass that did not fill a batch

    def __call__(self, seed: int, epoch: int, *rest: Any, **kw: Any) -> Any:
        self.since += self.last_pass
        if (epoch > 0 or self.cfg.hard_negatives.from_start) and (
            self.neighbours is None or self.since >= self.every
        ):
            self.mine()
            self.since = 0
        if self.neighbours is None:
            self.last_pass = len(self.index)
            return self.fallback(seed, epoch, *rest, **kw)
        world, b = self.acc.num_processes, self.cfg.batch_size
        plan = compose_batches(self.neighbours, b * world, np.random.default_rng(seed))
        self.last_pass = len(plan) * b * world
        self.left_out = len(self.ids) - self.last_pass
        r = self.acc.process_index
        ours = [self.ids[p[r * b : (r + 1) * b]].tolist() for p in plan]  # this rank's rows
        transform = None if self.feature_lookup is not None else self.model.image_transform(train=True)
        return plan_loader(
            self.cfg, self.index, ours, transform, self.model.tokenize, seed=seed, epoch=epoch, rank=r,
            feature_lookup=self.feature_lookup,
        )  # fmt: skip

    def mine(self) -> None:
        ids, img, txt = self.embed_training_set()
        self.ids, self.neighbours = ids, nearest_neighbours(img, txt, self.k)
        self.minings += 1

    @torch.no_grad()
    def embed_training_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(idx (N,), image embeddings (N, D), text embeddings (N, D)) of every training sample,
        in the same order on every rank."""
        model, acc, cfg = self.model, self.acc, self.cfg
        transform = None if self.feature_lookup is not None else model.image_transform(train=False)
        loader = build_loader(
            cfg, cfg.train, transform, model.tokenize, train=False, seed=0, rank=acc.process_index,
            world_size=acc.num_processes, feature_lookup=self.feature_lookup,
        )  # fmt: skip
        was_training = model.training
        model.eval()
        parts = []
        try:
            for batch in loader:
                if not batch["key"]:
                    continue
                image = batch.get("image")
                feats = batch.get("image_features")
                acts = batch.get("image_activations")  # the partial feature cache's
                img = model.encode_image(
                    image=None if image is None else image.to(acc.device),
                    image_features=None if feats is None else feats.to(acc.device),
                    image_activations=None if acts is None else acts.to(acc.device),
                )
                txt = model.encode_text(batch["text"].to(acc.device))
                parts.append((batch["idx"].numpy(), img.float().cpu().numpy(), txt.float().cpu().numpy()))
        finally:
            model.train(was_training)
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object(parts)  # every rank's parts, in rank order
        ids = np.concatenate([p[0] for p in parts])
        if len(np.unique(ids)) != len(ids) or (ids < 0).any():
            raise DataError("hard-negative mining needs a unique idx >= 0 for every training sample")
        return ids, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
