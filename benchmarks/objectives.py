"""The objective zoo compared on real data: the demo's LiT setup trained once per objective and seed.

    .venv/bin/python benchmarks/objectives.py                      # every row, seeds 0 1 2
    .venv/bin/python benchmarks/objectives.py --rows clip,dcl --seeds 0 --samples 1280   # a quick look

Every row trains ``train/lit_emoji.yaml`` (locked ImageNet EfficientNet-Lite0 from the feature
cache, MiniLM with its top 2 layers trained, linear heads) on the emoji shards with the same
data, sample budget, batch, optimizer and seed; only the objective differs (``loss.*`` and, for
the batch-level ideas, ``data.*`` overrides). Each trained model is scored on:

* zero-shot Animal-MNIST top-1 (``--zeroshot-per-class`` images of each of the 10 classes;
  chance 0.10), prompts from the set's templates;
* emoji retrieval R@1 / R@5 on the 392 held-out pairs (mean of text->image and image->text);
* the modality gap ||mean image emb - mean text emb|| over those held-out pairs;
* wall time of the training run (feature cache warm: it is built before the first row).

3 seeds per row give mean +- sample std. "vs CLIP" is the difference of means in units of its
standard error, sqrt(s_a^2/n + s_b^2/n): |z| >= 2 is a difference beyond seed noise.

The distillation rows need a teacher: a CLIP model of the same architecture trained first with
twice the budget and all MiniLM layers unlocked (seed 100; its scores are listed as well).
Results per run go to ``--out`` as JSON, so an interrupted benchmark continues where it
stopped. Run folders go to ``--out`` too, under ``<recipe stem>/`` for a ``--recipe`` with its
own data (``placed``), so two recipes never share one. The table page is printed and written to ``--out``/objectives.md; ``--record`` also
writes it to ``benchmarks/objectives.md`` (tracked). The reading of the figures is hand-written in
``benchmarks/objectives_analysis.md``, which this script never writes. Exit status 1 when a run
failed (the table has no targets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record

from clipkit.cli.demo import Listed, balanced_subset, build_data, score
from clipkit.config import load_config

TABLE_MD = ROOT / "benchmarks" / "objectives.md"  # written only with --record
ANALYSIS_MD = ROOT / "benchmarks" / "objectives_analysis.md"  # hand-written; never written here

# The emoji-only LiT recipe (the demo's before #14; its data is what build_data makes).
RECIPE = ROOT / "train" / "lit_emoji.yaml"

# (row name, overrides, what it is). "{teacher}" and "{n}" are filled in at run time.
ROWS: list[tuple[str, list[str], str]] = [
    ("clip", ["loss.name=clip"], "symmetric InfoNCE (baseline)"),
    ("clip_ls", ["loss.name=clip", "loss.args.label_smoothing=0.1"], "CLIP + label smoothing 0.1"),
    (
        "siglip",
        ["loss.name=siglip", "model.init_logit_scale=2.302585", "model.init_logit_bias=-10.0"],
        "pairwise sigmoid (t'=log 10, b=-10)",
    ),
    ("dcl", ["loss.name=dcl"], "decoupled contrastive"),
    ("dclw", ["loss.name=dclw"], "decoupled, weighted positives"),
    ("cwcl", ["loss.name=cwcl"], "continuously weighted (soft targets from the locked image tower)"),
    ("cwcl_center", ["loss.name=cwcl", "loss.args.center=true"], "CWCL on batch-centred tower features"),
    ("clip_unif_align", ["loss.name=clip_unif_align"], "CLIP + uniformity and alignment terms"),
    ("sogclr", ["loss.name=sogclr", "loss.args.num_samples={n}"], "moving-average denominators"),
    ("isogclr", ["loss.name=isogclr", "loss.args.num_samples={n}"], "+ individual temperatures"),
    (
        "mv_infonce",
        ["loss.name=mv_infonce", "loss.args.group_key=text"],
        "multi-positive: colour + silhouette views",
    ),
    ("albef_md", ["loss.name=albef_md"], "momentum distillation (EMA soft targets)"),
    ("albef_md_queue", ["loss.name=albef_md", "loss.args.queue_size=1024"], "+ a queue of 1,024"),
    ("mochi", ["loss.name=mochi"], "hard negative mixing"),
    ("m3col", ["loss.name=m3col"], "mixup contrastive"),
    ("distill_kl", ["loss.name=distill_kl", "loss.args.teacher={teacher}"], "KL to the teacher"),
    ("dclip", ["loss.name=dclip", "loss.args.teacher={teacher}"], "contrastive + cosine to teacher"),
    ("text_aug", ["data.word_dropout=0.1", "data.word_shuffle=true"], "CLIP + word dropout 0.1 and shuffle"),
    (
        "hard_negatives",
        ["data.hard_negatives.k=8", "data.hard_negatives.from_start=true"],
        "CLIP on Sample4Geo batches",
    ),
]
METRICS = ("zs_top1", "r1", "r5", "gap", "wall_s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="", help="comma list of row names (default: all)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples", type=int, default=6400, help="training samples per run (100 steps of 64)")
    p.add_argument(
        "--recipe",
        type=Path,
        default=RECIPE,
        help="the recipe every row trains (default train/lit_emoji.yaml on the emoji shards); another "
        "recipe keeps its own data.train (e.g. train/lit_mix.yaml: emoji + openclipart) and skips its val pass",
    )
    p.add_argument("--zeroshot-per-class", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core)")
    p.add_argument("--data", type=Path, default=ROOT / "data")
    p.add_argument("--out", type=Path, default=_record.RUNS / "objectives", help="runs, scores and the table")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    _record.add_record_flag(p, f"write the table page to {TABLE_MD.relative_to(ROOT)}")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def own_data(args: argparse.Namespace) -> bool:
    """True when the rows train on ``--recipe``'s own data (any recipe but the default)."""
    return Path(args.recipe).resolve() != RECIPE.resolve()


def common_overrides(args: argparse.Namespace, emoji: Path, seed: int, name: str) -> list[str]:
    data = ["data.val="] if own_data(args) else [f"data.train={emoji / 'train'}", f"data.val={emoji / 'val'}"]
    return [
        *data,
        f"train.samples={args.samples}",
        f"train.seed={seed}",
        f"train.output_dir={args.out}",
        f"train.run_name={name}",
        "train.checkpoint_every=0",
        "optim.warmup_steps=10",
        f"train.threads={args.threads}",
    ]


def placed(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """``overrides`` with the run folder under ``<out>/<recipe stem>/`` for a recipe with its own
    data, so two recipes' runs of one row and seed never share a folder (nor restart each other's).
    Applied after ``run_key``: the keys, and so the results already recorded, stay as they were."""
    if not own_data(args):
        return overrides
    folder = f"train.output_dir={args.out}"
    return [f"train.output_dir={args.out / Path(args.recipe).stem}" if o == folder else o for o in overrides]


def run_key(overrides: list[str], recipe: Path = RECIPE) -> str:
    """Short hash of the run's recipe and overrides (the thread count included: wall time depends
    on it). The default recipe hashes as before, so its earlier results stay valid."""
    extra = [] if Path(recipe).resolve() == RECIPE.resolve() else [f"recipe={Path(recipe).resolve()}"]
    return hashlib.sha1("\n".join(overrides + extra).encode()).hexdigest()[:10]


def gap_of(model: torch.nn.Module, retrieval: object) -> float:
    """Modality gap over the held-out pairs (first caption of each image)."""
    from clipkit.losses.stats import modality_gap

    samples = list(retrieval)
    feats = torch.stack([s["image"] for s in samples])
    captions = [s["captions"][0] for s in samples]
    with torch.inference_mode():
        img = model.encode_image(image_features=feats)
        txt = torch.cat(
            [model.encode_text(model.tokenize(captions[i : i + 128])) for i in range(0, len(captions), 128)]
        )
    return float(modality_gap(img, txt))


def train_and_score(
    overrides: list[str], out_json: Path, feats: tuple, keep: bool = False, recipe: Path = RECIPE
) -> dict:
    """Train one run (or read its earlier result) and score it."""
    from clipkit.models.load import load_trained
    from clipkit.training.loop import train

    if out_json.is_file():
        return json.loads(out_json.read_text())
    cfg = load_config(recipe, overrides)
    t0 = time.perf_counter()
    run_dir = train(cfg)
    wall = time.perf_counter() - t0
    model, _, _ = load_trained(run_dir)
    zs, rt = feats
    m = score(model, zs, rt, 128)
    r = m["retrieval"]
    result = {
        "zs_top1": m["zeroshot"]["acc1"],
        "r1": (r["image_retrieval_recall@1"] + r["text_retrieval_recall@1"]) / 2,
        "r5": (r["image_retrieval_recall@5"] + r["text_retrieval_recall@5"]) / 2,
        "gap": gap_of(model, rt),
        "wall_s": wall,
        "run_dir": str(run_dir),
        "overrides": overrides,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    if not keep:  # checkpoints are ~140 MB each; the scores are what this benchmark keeps
        shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
    return result


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def z_vs(a: list[float], b: list[float]) -> float:
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return (ma - mb) / se if se > 0 else math.copysign(math.inf, ma - mb) if ma != mb else 0.0


def table(results: dict[str, list[dict]], info: dict[str, str]) -> str:
    head = "| objective | what | zero-shot top-1 | retrieval R@1 | retrieval R@5 | modality gap | wall s | top-1 vs CLIP | R@1 vs CLIP |"
    lines = [head, "|" + "---|" * 9]
    base = results.get("clip")
    for name, runs in results.items():
        cells = []
        for m in METRICS:
            mu, sd = mean_std([r[m] for r in runs])
            cells.append(f"{mu:.1f} ± {sd:.1f}" if m == "wall_s" else f"{mu:.3f} ± {sd:.3f}")
        vs = []
        for m in ("zs_top1", "r1"):
            if base is None or name == "clip":
                vs.append("-")
                continue
            a, b = [r[m] for r in runs], [r[m] for r in base]
            vs.append(f"{statistics.fmean(a) - statistics.fmean(b):+.3f} (z {z_vs(a, b):+.1f})")
        lines.append(f"| {name} | {info.get(name, '')} | " + " | ".join(cells + vs) + " |")
    return "\n".join(lines)


def wanted_rows(args: argparse.Namespace) -> list[str]:
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()] or [r[0] for r in ROWS]
    unknown = set(wanted) - {r[0] for r in ROWS}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; --list shows them")
    return wanted


def prepare(args: argparse.Namespace) -> tuple[Path, int, tuple]:
    """Data, the warm feature cache, and the scoring sets as locked-tower features.

    Returns (emoji shard folder, training samples per pass, (zero-shot set, retrieval set)).
    """
    from clipkit.evaluation.cached import tower_feature_dataset
    from clipkit.evaluation.datasets import ClipBenchmarkWds
    from clipkit.models import build_model
    from clipkit.training.feature_cache import build_feature_cache

    emoji, animal_dir = build_data(args.data)
    base_cfg = load_config(args.recipe, common_overrides(args, emoji, 0, "probe"))
    n_train = sum(json.loads((emoji / "train" / "sizes.json").read_text()).values())
    tower_model = build_model(base_cfg.model)
    print(build_feature_cache(tower_model, base_cfg.data, base_cfg.data.train, args.out)[1], flush=True)
    animals = ClipBenchmarkWds(animal_dir)
    animals = Listed(balanced_subset(animals, args.zeroshot_per_class), animals)
    feats = (
        tower_feature_dataset(tower_model, animals, 128, "Animal-MNIST"),
        tower_feature_dataset(tower_model, ClipBenchmarkWds(emoji, split="val"), 128, "emoji val"),
    )
    return emoji, n_train, feats


def train_teacher(args: argparse.Namespace, emoji: Path, feats: tuple, wanted: list[str]) -> str:
    """Run folder of the distillation teacher, trained first; "" when no wanted row needs one."""
    if not any("{teacher}" in " ".join(ov) for name, ov, _ in ROWS if name in wanted):
        return ""
    t_ov = common_overrides(args, emoji, 100, "teacher")
    t_ov += [f"train.samples={2 * args.samples}", "model.text.unlocked_layers=7", "loss.name=clip"]
    t_json = args.out / f"teacher-{run_key(t_ov, args.recipe)}.json"
    t_res = train_and_score(placed(args, t_ov), t_json, feats, keep=True, recipe=args.recipe)
    teacher = t_res["run_dir"]
    print(f"[objectives] teacher {teacher}: top-1 {t_res['zs_top1']:.3f}, R@1 {t_res['r1']:.3f}", flush=True)
    return teacher


def run_rows(
    args: argparse.Namespace, wanted: list[str], seeds: list[int], setting: tuple
) -> tuple[dict[str, list[dict]], list[str]]:
    """Train and score every wanted row and seed; returns (results per row, failed runs)."""
    emoji, n_train, feats, teacher = setting
    results: dict[str, list[dict]] = {}
    failed: list[str] = []
    for name, row_ov, _ in ROWS:
        if name not in wanted:
            continue
        for seed in seeds:
            ov = common_overrides(args, emoji, seed, f"{name}-s{seed}")
            ov += [o.replace("{teacher}", teacher).replace("{n}", str(n_train)) for o in row_ov]
            try:
                res = train_and_score(
                    placed(args, ov),
                    args.out / f"{name}-s{seed}-{run_key(ov, args.recipe)}.json",
                    feats,
                    recipe=args.recipe,
                )
            except Exception as err:  # noqa: BLE001  (one broken row must not cost the others)
                failed.append(f"{name} seed {seed}: {type(err).__name__}: {err}")
                print(f"[objectives] FAILED {failed[-1]}", flush=True)
                continue
            results.setdefault(name, []).append(res)
            print(
                f"[objectives] {name} seed {seed}: top-1 {res['zs_top1']:.3f} R@1 {res['r1']:.3f} "
                f"R@5 {res['r5']:.3f} gap {res['gap']:.3f} ({res['wall_s']:.0f} s)",
                flush=True,
            )
    return results, failed


def report(args: argparse.Namespace, argv: list[str] | None, seeds: list[int], outcome: tuple) -> str:
    """The markdown page: the command, the setting, the table and any failed runs."""
    results, failed, feats, teacher = outcome
    text = table(results, {name: what for name, _, what in ROWS})
    cmd = _record.command_line("objectives.py", list(sys.argv[1:] if argv is None else argv))
    return (
        "# Objectives on the demo LiT setup\n\n"
        f"`{cmd}` ({time.strftime('%Y-%m-%d %H:%M')}, {sum(r['wall_s'] for rs in results.values() for r in rs):.0f} s of training in all; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads)\n\n"
        f"Each run: `{Path(args.recipe).resolve().relative_to(ROOT) if Path(args.recipe).resolve().is_relative_to(ROOT) else args.recipe}`"
        f"{' on its own training data, no val pass' if own_data(args) else ''}, {args.samples} samples (batch 64), "
        "warmup 10 steps, seeds "
        f"{', '.join(map(str, seeds))}; zero-shot on {len(feats[0])} Animal-MNIST images (chance 0.10), "
        f"retrieval and modality gap on {len(feats[1])} held-out emoji pairs. Mean ± sample std over seeds; "
        "z = difference of means / its standard error (|z| >= 2: beyond seed noise).\n"
        + (f"Teacher for the distillation rows: {teacher}.\n" if teacher else "")
        + "\n"
        + text
        + "\n"
        + ("\nFailed runs:\n" + "".join(f"- {f}\n" for f in failed) if failed else "")
        + f"\nWhat these figures show is read by hand in `{ANALYSIS_MD.name}` (not written by this script).\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, ov, what in ROWS:
            print(f"{name:16s} {what}: {' '.join(ov)}")
        return 0
    wanted = wanted_rows(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    _record.output_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    emoji, n_train, feats = prepare(args)
    teacher = train_teacher(args, emoji, feats, wanted)
    results, failed = run_rows(args, wanted, seeds, (emoji, n_train, feats, teacher))
    doc = report(args, argv, seeds, (results, failed, feats, teacher))
    print("\n" + doc)
    tracked = (
        TABLE_MD if not own_data(args) else TABLE_MD.with_name(f"objectives_{Path(args.recipe).stem}.md")
    )
    for path in (args.out / "objectives.md", *([tracked] if args.record else [])):
        _record.write_text(path, doc, record=path == tracked)
        print(f"table written to {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
