"""Two CPU processes (gloo): each embeds half of every dataset; after the gather both hold the
single-process results (zero-shot predictions, retrieval recalls, embeddings in reading
order), and each decoded about half of the images."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp
from dist_helpers import free_port, gloo_group

WORLD = 2


def _evaluate(root: str, ranks) -> dict:
    from eval_helpers import ColorModel

    from clipkit.evaluation.dataspec import open_dataset
    from clipkit.evaluation.embed import embed_dataset
    from clipkit.evaluation.retrieval import evaluate_retrieval
    from clipkit.evaluation.zeroshot import run_zeroshot

    model = ColorModel()
    zs = run_zeroshot(model, open_dataset(f"{root}/cls"), batch_size=4, ranks=ranks)
    rt = evaluate_retrieval(model, open_dataset(f"{root}/caps"), batch_size=4, ks=(1, 3), ranks=ranks)
    emb = embed_dataset(model, open_dataset(f"{root}/caps"), batch_size=3, ranks=ranks, texts=True)
    return {
        "zs": zs.metrics,
        "pred": zs.pred.tolist(),
        "keys": zs.keys,
        "rt": rt,
        "emb": emb.image_emb,
        "text": emb.text_emb,
        "t2i": emb.text_to_image.tolist(),
        "images_seen": model.images_seen,
    }


def _worker(rank: int, port: int, root: str, out: str) -> None:
    from clipkit.evaluation.distributed import Ranks

    with gloo_group(rank, WORLD, port):
        torch.save(_evaluate(root, Ranks(rank, WORLD)), Path(out) / f"rank{rank}.pt")


def test_two_ranks_equal_one_process(tmp_path):
    from eval_helpers import wds_classification, wds_retrieval

    from clipkit.evaluation.distributed import Ranks

    wds_classification(tmp_path / "cls", n=23, per_shard=5)
    wds_retrieval(tmp_path / "caps", n=13, per_shard=4)
    single = _evaluate(str(tmp_path), Ranks())
    mp.spawn(_worker, args=(free_port(), str(tmp_path), str(tmp_path)), nprocs=WORLD, join=True)
    calls = []
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key in ("zs", "pred", "keys", "rt", "t2i"):
            assert got[key] == single[key], key
        torch.testing.assert_close(got["emb"], single["emb"])
        torch.testing.assert_close(got["text"], single["text"])
        calls.append(got["images_seen"])
    # The ranks split the images: together they encoded exactly what one process did, evenly.
    assert sum(calls) == single["images_seen"] and abs(calls[0] - calls[1]) <= 5 + 2 * 4  # shards
