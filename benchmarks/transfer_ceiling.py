"""Diagnostic for issue #14: how far can a recipe's locked towers go, whatever is trained on them?

Two measurements on the towers of a recipe (default ``train/lit_mix.yaml``), scored on the sets
of a suite (default ``eval/transfer.yaml``):

1. **A supervised ceiling on a zero-shot set** (``--ceiling-set``, default ``animal_mnist``). Every
   training image whose caption names exactly one of the set's classes (as a word, or one of the
   few synonyms in ``SYNONYMS``) becomes a labelled example; a logistic regression and a 1-NN
   classifier on the locked image tower's features are scored on the set. A zero-shot recipe
   learns its image -> text map from these same images, among thousands of other concepts, with
   no labels; this classifier is handed the labels. It is an upper mark for what the training
   data teaches about those classes through that tower, not a proof.
2. **A heads-only proxy of the recipe.** Both towers locked (the text tower's top layers, which
   the recipe may train, stay frozen here), the features of every image and of every caption under
   every caption template computed once, then only the two linear heads and the temperature train:
   the recipe's sources and weights (resampled), templates, batch size, lr, weight decay, warmup
   and cosine schedule (``build_scheduler``), its projections and its loss (``build_loss``). Each suite set is scored as the suite scores it
   (zero-shot top-1 with the set's prompts, text -> image recall@5). A variant costs seconds, so
   it scans image-feature pooling (``--pool-grids``, ``model.vision.pool_grid``) and budgets
   (``--budgets``, multiples of ``train.samples``) over ``--seeds`` seeds, where a real run costs
   minutes. Its scores sit near the real recipe's (benchmarks/recipes_analysis.md compares them);
   it ranks variants, and the sweep (``clipkit sweep``) confirms them.

    .venv/bin/python benchmarks/transfer_ceiling.py [--recipe train/lit_mix.yaml]
        [--suite eval/transfer.yaml] [--pool-grids 1 2] [--budgets 1 4] [--seeds 3] [--record]

No target: it prints both tables. Its report goes to runs/bench/transfer_ceiling/ (and, with
--record, to RESULTS.md). It reads the data the suite and the recipe name (``clipkit data build``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record

# Words that name a class without being its name; only those of the ceiling set's classes count.
SYNONYMS = {
    "ewe": "sheep", "ram": "sheep", "lamb": "sheep", "puppy": "dog", "kitten": "cat", "pony": "horse",
    "bull": "cow", "ox": "cow", "calf": "cow",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="train/lit_mix.yaml", help="the recipe whose towers and data are used")
    p.add_argument("--suite", default="eval/transfer.yaml", help="the sets to score on")
    p.add_argument("--ceiling-set", default="animal_mnist", help="the suite's zero-shot set for part 1")
    p.add_argument(
        "--max-images", type=int, default=2000, help="at most N images per suite set (a seeded draw)"
    )
    p.add_argument(
        "--max-train", type=int, default=0, help="at most N samples per source (0 = all; a quick look)"
    )
    p.add_argument("--pool-grids", type=int, nargs="+", default=[1, 2], help="model.vision.pool_grid values")
    p.add_argument("--budgets", type=float, nargs="+", default=[1, 4], help="multiples of train.samples")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of each proxy variant")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    _record.add_record_flag(p)
    return p


def class_of(caption: str, classes: list[str]) -> int | None:
    """The one class ``caption`` names (a class name or a synonym, as a whole word), else None."""
    hits = {SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", caption.lower())} & set(classes)
    return classes.index(hits.pop()) if len(hits) == 1 else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from clipkit.config import load_config
    from clipkit.data.caption_templates import fill, resolve_templates
    from clipkit.evaluation.dataspec import open_dataset
    from clipkit.evaluation.metrics import retrieval_metrics, zeroshot_metrics
    from clipkit.evaluation.suite import load_suite
    from clipkit.evaluation.zeroshot import class_prompts
    from clipkit.losses import build_loss
    from clipkit.models.projection import build_projection
    from clipkit.models.towers import build_tower
    from clipkit.models.towers_timm import pool_features
    from clipkit.training.schedule import build_scheduler

    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    lines = [f"load average at start: {_record.load_average()}"]
    t0 = time.perf_counter()
    cfg = load_config(ROOT / opts.recipe if not Path(opts.recipe).exists() else opts.recipe)
    suite = load_suite(ROOT / opts.suite if not Path(opts.suite).exists() else opts.suite)

    vision = cfg.model.vision  # one tower: every pooling is read off its last feature map
    tower = build_tower(type(vision)(**{**vision.__dict__, "locked": True, "unlocked_layers": 0}), "vision")
    tower.eval()
    text_cfg = cfg.model.text
    text = build_tower(type(text_cfg)(**{**text_cfg.__dict__, "locked": True, "unlocked_layers": 0}), "text")
    text.eval()
    transform = tower.transform(False)

    def read(ds, limit: int | None) -> list[dict]:
        items = list(ds)
        if limit and len(items) > limit:
            keep = np.random.default_rng(0).permutation(len(items))[:limit]
            items = [items[i] for i in sorted(keep)]
        return items

    backbone = tower.model

    def image_features(items: list[dict]) -> dict[int, torch.Tensor]:
        """{pool_grid: (N, out_dim)}: one backbone pass, each pooling from its last map (as the
        tower's forward pools it; tests/test_pool_grid.py)."""
        out: dict[int, list[torch.Tensor]] = {g: [] for g in opts.pool_grids}
        with torch.inference_mode():
            for i in range(0, len(items), 128):
                fmap = backbone.forward_features(
                    torch.stack([transform(s["image"]) for s in items[i : i + 128]])
                )
                for g in opts.pool_grids:
                    out[g].append(pool_features(backbone, fmap, g))
        return {g: torch.cat(v) for g, v in out.items()}

    def text_features(texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([text(text.tokenize(texts[i : i + 256])) for i in range(0, len(texts), 256)])

    # ------------------------------------------------------------------ the training sources
    sources = cfg.data.train.split("::")
    weights = list(cfg.data.train_weights) or [1.0] * len(sources)
    templates = resolve_templates(list(cfg.data.caption_templates)) or ["{}"]
    train = []
    for path in sources:
        items = read(open_dataset(path), opts.max_train)
        captions = [s["captions"][0] for s in items]
        train.append(
            {
                "path": path,
                "captions": captions,
                "img": image_features(items),
                # (N, T, D): each caption under each template, drawn per sample as training does
                "txt": torch.stack([text_features([fill(t, c) for c in captions]) for t in templates], 1),
            }
        )
        print(f"{path}: {len(items)} training samples", flush=True)

    # ------------------------------------------------------------------ the suite's sets
    sets = {}
    for entry in suite.entries:
        if entry.classnames is not None or entry.templates is not None:
            raise SystemExit(f"{entry.name}: class names / templates set in the suite are not read here")
        ds = open_dataset(entry.path, split=entry.split or None, alpha=entry.alpha, name=entry.name)
        items = read(ds, opts.max_images)
        feats = image_features(items)
        if entry.task == "zeroshot_classification":
            prompts = class_prompts(ds.classnames, ds.templates)
            flat = text_features([p for ps in prompts for p in ps]).view(len(prompts), len(prompts[0]), -1)
            sets[entry.name] = (
                "zeroshot",
                feats,
                flat,
                torch.tensor([s["label"] for s in items]),
                ds.classnames,
            )
        elif entry.task == "zeroshot_retrieval":
            caps = [c for s in items for c in s["captions"]]
            owner = torch.tensor([i for i, s in enumerate(items) for _ in s["captions"]])
            sets[entry.name] = ("retrieval", feats, text_features(caps), owner, None)
        else:
            print(f"{entry.name}: {entry.task} is not scored here", flush=True)
            continue
        print(f"{entry.name}: {len(items)} images", flush=True)

    # ------------------------------------------------------------------ 1. the supervised ceiling
    if opts.ceiling_set not in sets or sets[opts.ceiling_set][0] != "zeroshot":
        raise SystemExit(f"--ceiling-set {opts.ceiling_set!r} is not a zero-shot set of {opts.suite}")
    _, feats, _, labels, classes = sets[opts.ceiling_set]
    lines += [
        "",
        f"### 1. Supervised ceiling on {opts.ceiling_set} ({len(labels)} images, {len(classes)} classes)",
        "",
    ]
    lines += [f"Training images whose caption names exactly one class (synonyms: {SYNONYMS}):", ""]
    lines += [
        "| pooling | labelled images | per class | logistic regression (best C) | 1-NN (cosine) |",
        "|---|---|---|---|---|",
    ]
    for g in opts.pool_grids:
        X, y = [], []
        for src in train:
            for i, cap in enumerate(src["captions"]):
                if (c := class_of(cap, classes)) is not None:
                    X.append(src["img"][g][i].numpy())
                    y.append(c)
        X, y = np.stack(X), np.array(y)
        test = feats[g].numpy()
        scaler = StandardScaler().fit(X)
        accs = {}
        for C in (0.01, 0.1, 1.0, 10.0, 100.0):
            clf = LogisticRegression(max_iter=5000, C=C, class_weight="balanced").fit(scaler.transform(X), y)
            accs[C] = float((clf.predict(scaler.transform(test)) == labels.numpy()).mean())
        best = max(accs, key=accs.get)
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
        nn = y[(unit(test) @ unit(X).T).argmax(1)]
        lines.append(
            f"| grid {g} | {len(y)} | {np.bincount(y, minlength=len(classes)).tolist()} | "
            f"{accs[best]:.3f} (C={best}; range {min(accs.values()):.3f}-{max(accs.values()):.3f}) | "
            f"{float((nn == labels.numpy()).mean()):.3f} |"
        )

    # ------------------------------------------------------------------ 2. the heads-only proxy
    loss_fn = build_loss(cfg.loss)

    def proxy(g: int, budget: float, seed: int) -> dict[str, float]:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        # the model's heads, loss and warmup-cosine schedule, as the recipe builds them
        m = cfg.model
        w_img = build_projection(m.projection, train[0]["img"][g].shape[1], m.embed_dim, "vision")
        w_txt = build_projection(m.projection, text.out_dim, m.embed_dim, "text")
        scale = torch.nn.Parameter(torch.tensor(float(m.init_logit_scale)))
        heads = [*w_img.parameters(), *w_txt.parameters()]
        bs = cfg.data.batch_size
        opt = torch.optim.AdamW(
            [
                {"params": heads, "weight_decay": cfg.optim.weight_decay},
                {"params": [scale], "weight_decay": 0.0},
            ],
            lr=cfg.optim.lr,
        )
        steps = max(1, round(cfg.train.samples * budget / bs))
        schedule = build_scheduler(opt, cfg.optim, steps)
        probs = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        for _ in range(steps):
            which = torch.multinomial(probs, bs, replacement=True, generator=gen)
            xs, ts = [], []
            for k, src in enumerate(train):
                n = int((which == k).sum())
                idx = torch.randint(len(src["captions"]), (n,), generator=gen)
                tpl = torch.randint(len(templates), (n,), generator=gen)
                xs.append(src["img"][g][idx])
                ts.append(src["txt"][idx, tpl])
            emb = {
                "image_emb": F.normalize(w_img(torch.cat(xs)), dim=-1),
                "text_emb": F.normalize(w_txt(torch.cat(ts)), dim=-1),
                "logit_scale": scale.clamp(max=m.max_logit_scale).exp(),
            }
            opt.zero_grad()
            loss_fn(emb)["loss"].backward()
            opt.step()
            schedule.step()
        out = {}
        with torch.no_grad():
            for name, (kind, feats, txt, target, _) in sets.items():
                img = F.normalize(w_img(feats[g]), dim=-1)
                if kind == "zeroshot":
                    cls = F.normalize(F.normalize(w_txt(txt), dim=-1).mean(1), dim=-1)
                    out[name] = zeroshot_metrics(img @ cls.T, target)["acc1"]
                else:
                    emb = F.normalize(w_txt(txt), dim=-1)
                    out[name] = retrieval_metrics(img, emb, target, ks=[5])["image_retrieval_recall@5"]
        return out

    names = list(sets)
    head = "| pooling | samples | " + " | ".join(f"{n}" for n in names) + " |"
    lines += [
        "",
        f"### 2. Heads-only proxy of {opts.recipe} (both towers locked), mean ± sd over {opts.seeds} seeds",
        "",
    ]
    lines += [
        "Zero-shot sets: top-1; retrieval sets: text -> image R@5.",
        "",
        head,
        "|" + "---|" * (len(names) + 2),
    ]
    for g in opts.pool_grids:
        for budget in opts.budgets:
            runs = [proxy(g, budget, s) for s in range(opts.seeds)]
            cells = [
                f"{np.mean([r[n] for r in runs]):.3f} ± {np.std([r[n] for r in runs], ddof=1) if len(runs) > 1 else 0:.3f}"
                for n in names
            ]
            lines.append(f"| grid {g} | {int(cfg.train.samples * budget):,} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"load average at end: {_record.load_average()}; {time.perf_counter() - t0:.0f} s"]
    title = "Transfer ceiling of the demo's locked towers (issue #14)"
    report = "\n".join([*_record.heading(title, "transfer_ceiling.py", argv), *lines, ""])
    print(report)
    _record.save_report("transfer_ceiling", report, record=opts.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
