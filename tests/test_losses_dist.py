"""Two CPU processes (gloo): the gathered losses against open_clip and the single-process loss.

Scaling checked here (see ``clipkit/losses/gather.py``): with ``gather_with_grad`` the
gradient reaching rank r's local embeddings is ``world_size * dL/d emb_r`` of the
single-process loss ``L`` over the concatenated batch, and the mean over ranks of the
per-rank losses and of the ``logit_scale`` / ``logit_bias`` gradients equals those of
``L``; DDP's gradient averaging therefore reproduces the single-process gradient.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from dist_helpers import free_port, gloo_group

from clipkit.losses import LOSSES


def _load_open_clip_loss():
    # open_clip/loss.py imports only torch; loading the file alone saves each spawned
    # process the ~5 s import of the whole open_clip package (timm, tokenizers, ...).
    folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_open_clip_loss", Path(folder) / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oc = _load_open_clip_loss()
WORLD, B, D = 2, 3, 5
KEYS = ("image_emb", "text_emb", "logit_scale", "logit_bias")
# case -> (registered loss, its args); open_clip's loss with the same options is the oracle
CASES = {
    "clip_global_grad": ("clip", {"local_loss": False, "gather_with_grad": True}),
    "clip_local_grad": ("clip", {"local_loss": True, "gather_with_grad": True}),
    "clip_global_nograd": ("clip", {"local_loss": False, "gather_with_grad": False}),
    "clip_local_nograd": ("clip", {"local_loss": True, "gather_with_grad": False}),
    "siglip": ("siglip", {}),
}
# The zoo gathers with gradient and scores the global batch: checked against one process only.
ZOO = {
    "dclw": ("dclw", {}),
    "cwcl": ("cwcl", {}),
    "clip_unif_align": ("clip_unif_align", {"cross_uniform_weight": 0.5}),
    "mv_infonce": ("mv_infonce", {}),
    "sogclr": ("sogclr", {"num_samples": 16, "temperature": 0.2}),
    "isogclr": ("isogclr", {"num_samples": 16}),
    "albef_md": ("albef_md", {"queue_size": 4}),
    "mochi": ("mochi", {"num_hard": 3, "num_mix": 4, "num_anchor_mix": 2}),
    "m3col": ("m3col", {"modality": "both"}),
    "distill_kl": ("distill_kl", {"teacher": None}),
    "dclip": ("dclip", {"teacher": None}),
}


def global_inputs() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    n = WORLD * B
    out = {
        "image_emb": F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1),
        "text_emb": F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1),
        "logit_scale": torch.tensor(7.0, dtype=torch.float64),
        "logit_bias": torch.tensor(-1.5, dtype=torch.float64),
        "image_tower_features": torch.randn(n, 4, generator=g, dtype=torch.float64),
        # A momentum model's (albef_md) and a teacher's (distill_kl, dclip) embeddings.
        **{
            k: F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
            for k in ("momentum_image_emb", "momentum_text_emb", "teacher_image_emb", "teacher_text_emb")
        },
        "teacher_logit_scale": torch.tensor(12.0, dtype=torch.float64),
    }
    # Sample 3 has two captions, one on each rank (mv_infonce groups across ranks).
    return out, {"idx": torch.tensor([3, 11, 0, 7, 3, 9])}


def rank_slice(tree: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * B : (rank + 1) * B] if v.dim() else v for k, v in tree.items()}


def open_clip_loss(name: str, args: dict, rank: int) -> torch.nn.Module:
    if name == "clip":
        return oc.ClipLoss(**args, rank=rank, world_size=WORLD)
    return oc.SigLipLoss(rank=rank, world_size=WORLD, dist_impl="gather")


def run(loss: torch.nn.Module, out: dict, batch: dict, use_open_clip: bool = False) -> dict:
    for k in KEYS:
        out[k].requires_grad_()
    if use_open_clip:
        value = loss(out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"])
    else:
        value = loss(out, batch)["loss"]
    gs = torch.autograd.grad(value, [out[k] for k in KEYS], allow_unused=True)
    state = {} if use_open_clip else copy.deepcopy(loss.state_dict())
    return {"loss": value.detach(), **{k: g for k, g in zip(KEYS, gs)}, "state": state}


def rank_results(rank: int) -> dict:
    results = {}
    for case, (name, args) in {**CASES, **ZOO}.items():
        for impl in ("ours", "open_clip") if case in CASES else ("ours",):
            out, batch = (rank_slice(t, rank) for t in global_inputs())
            loss = LOSSES.build(name, **args) if impl == "ours" else open_clip_loss(name, args, rank)
            torch.manual_seed(0)  # mochi, m3col: rank 0 draws, as the single process below
            results[case, impl] = run(loss, out, batch, impl == "open_clip")
    return results


def worker(rank: int, port: int, folder: str) -> None:
    warnings.simplefilter("ignore", FutureWarning)  # open_clip's torch.distributed.nn.all_gather
    with gloo_group(rank, WORLD, port):
        torch.save(rank_results(rank), os.path.join(folder, f"rank{rank}.pt"))


def check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}")


def test_two_process_gather(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for case, (name, args) in {**CASES, **ZOO}.items():
        # 1. Rank by rank, the same loss and gradients as open_clip with the same options.
        for r in range(WORLD if case in CASES else 0):
            ours, ref = per_rank[r][case, "ours"], per_rank[r][case, "open_clip"]
            for k in ("loss",) + KEYS:
                if k == "logit_bias" and ref[k] is None:
                    continue
                check(ours[k], ref[k], f"{case} rank {r} {k} vs open_clip")

        # 2. With gather_with_grad: the single-process loss over the concatenated batch.
        torch.manual_seed(0)
        single = run(LOSSES.build(name, **args), *global_inputs())
        got = [per_rank[r][case, "ours"] for r in range(WORLD)]
        if args.get("gather_with_grad", True):
            for k in ("loss",) + KEYS[2:]:
                if single[k] is not None:
                    mean = sum(g[k] for g in got) / WORLD
                    check(mean, single[k], f"{case} rank-mean {k} vs single process")
            for r in range(WORLD):
                for k in KEYS[:2]:
                    want = WORLD * single[k][r * B : (r + 1) * B]
                    check(got[r][k], want, f"{case} rank {r} {k} vs single process")
                for k, v in single["state"].items():  # per-sample state stays in sync across ranks
                    check(got[r]["state"][k], v, f"{case} rank {r} state {k} vs single process")
        elif not args["local_loss"]:
            # Documented open_clip behaviour without gather_with_grad: each rank gets the
            # global loss and its unscaled gradient, i.e. 1/WORLD of the gathered version.
            for r in range(WORLD):
                check(got[r]["loss"], single["loss"], f"{case} rank {r} loss")
                for k in KEYS[:2]:
                    check(got[r][k], single[k][r * B : (r + 1) * B], f"{case} rank {r} {k}")
