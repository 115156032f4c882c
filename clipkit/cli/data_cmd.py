"""``clipkit data {build,inspect,validate,filter}``: make shards, look at them, check them, clean them.

clipkit data build photos/ --out shards/photos                  # folder + sidecar .txt captions
clipkit data build pairs.parquet --image-col url --caption-col caption --out shards/pairs
clipkit data build captions_coco.json --root coco/ --split train,restval --captions each --out shards/coco
clipkit data build urls.txt --out shards/web --timeout 10 --retries 2
clipkit data build urls.txt --out shards/web --engine ray --address auto   # same shards, Ray tasks
clipkit data build emoji|animal-mnist|openclipart --out data/NAME   # bundled real sources
clipkit data inspect shards/photos --preview 16
clipkit data validate shards/photos                               # exit 1 naming each bad member
clipkit data filter shards/photos --out shards/clean --dedup --model runs/lit --top-fraction 0.3
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from clipkit.errors import ClipkitError

# Build options; None means "not given" (bundled builders refuse them), else the default.
BUILD_DEFAULTS = {
    "image_col": None, "caption_col": None, "root": None, "split": None, "caption_ext": "txt",
    "captions": "first", "allow_missing_caption": False, "resize": "keep_ratio", "max_side": 512,
    "min_side": 0, "format": "jpg", "quality": 95, "shard_size": 1000, "prefix": "shard",
    "threads": 16, "timeout": 10.0, "retries": 2, "user_agent": None, "incremental": False,
    "dedup": False, "min_words": 0, "max_words": 0, "min_chars": 0, "max_chars": 0, "blocklist": None,
    "engine": "local", "address": None,
}  # fmt: skip


def _caption_rule_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("caption rules and dedup")
    g.add_argument("--dedup", action="store_true", default=None, help="drop exact duplicate images")
    for name, what in (("min-words", "fewer words"), ("max-words", "more words"),
                       ("min-chars", "fewer characters"), ("max-chars", "more characters")):  # fmt: skip
        g.add_argument(f"--{name}", type=int, metavar="N", help=f"drop captions with {what} (0: off)")
    g.add_argument("--blocklist", metavar="FILE", help="drop captions containing a listed word / phrase")


def _add_build(dsub: argparse._SubParsersAction) -> None:
    b = dsub.add_parser(
        "build", help="write shards from a folder, manifest, caption JSON, URL list or bundled source"
    )
    b.add_argument(
        "source",
        help="a folder, manifest, Karpathy caption JSON, URL list, or the name of a bundled source "
        "(emoji, animal-mnist, openclipart, ...; data_tools/build_<name>.py)",
    )
    b.add_argument("--out", required=True, help="output folder")
    s = b.add_argument_group("source")
    s.add_argument("--image-col", help="manifest column with the image path or URL")
    s.add_argument("--caption-col", action="append", help="manifest caption column (repeat for several)")
    s.add_argument("--root", help="folder that relative image paths start from (default: the manifest's)")
    s.add_argument("--split", help="Karpathy JSON: split(s) to take, comma-separated (e.g. train,restval)")
    s.add_argument("--caption-ext", help="folder source: sidecar caption extension (default txt)")
    s.add_argument("--captions", choices=["first", "each", "lines"], help="several captions: first (default), "
                   "one sample each, or all in one txt, one per line")  # fmt: skip
    s.add_argument("--allow-missing-caption", action="store_true", default=None,
                   help="write images without a caption (no txt) instead of dropping them")  # fmt: skip
    i = b.add_argument_group("images")
    i.add_argument(
        "--resize", choices=["keep_ratio", "center_crop", "border", "none"], help="default keep_ratio"
    )
    i.add_argument("--max-side", type=int, help="target side in pixels (default 512; never enlarges)")
    i.add_argument("--min-side", type=int, help="drop images whose shorter side is below this (too_small)")
    i.add_argument("--format", choices=["jpg", "webp", "png"], help="output format (default jpg)")
    i.add_argument("--quality", type=int, help="jpg / webp quality (default 95)")
    o = b.add_argument_group("run")
    o.add_argument("--shard-size", type=int, help="source items per shard (default 1000)")
    o.add_argument("--prefix", help="shard name prefix (default shard)")
    o.add_argument("--threads", type=int, help="concurrent downloads / image jobs (default 16)")
    o.add_argument("--timeout", type=float, help="seconds per download attempt (default 10)")
    o.add_argument("--retries", type=int, help="retries of a failed download (default 2)")
    o.add_argument("--user-agent", help="HTTP User-Agent (default clipkit/<version>)")
    o.add_argument(
        "--incremental", action="store_true", default=None, help="keep finished shards of a killed run"
    )
    o.add_argument("--engine", choices=["local", "ray"], help="local: a thread pool in this process (default); "
                   "ray: one Ray task per shard, same output (pip install 'clipkit[ray]')")  # fmt: skip
    o.add_argument("--address", help="--engine ray: the cluster (e.g. auto, HOST:6379, ray://HOST:10001; "
                   "default $RAY_ADDRESS, else a local cluster of this machine's cores)")  # fmt: skip
    _caption_rule_flags(b)
    b.set_defaults(run=run_build)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build, inspect, validate and filter webdataset shards")
    dsub = p.add_subparsers(dest="data_command", required=True)
    _add_build(dsub)
    n = dsub.add_parser("inspect", help="counts, histograms, duplicate keys, broken samples, preview grid")
    n.add_argument("shards", help="shard folder or brace pattern")
    n.add_argument(
        "--preview", type=int, default=16, metavar="N", help="random samples in the grid (0: none)"
    )
    n.add_argument("--preview-out", help="PNG path (default: <shard folder>/_preview.png)")
    n.add_argument("--json", help="also write the report as JSON")
    n.add_argument("--limit", type=int, help="look at the first N samples only")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--caption-key", default="txt")
    n.set_defaults(run=run_inspect)
    v = dsub.add_parser("validate", help="full scan; exit 1 naming each corrupt shard and member")
    v.add_argument("shards", help="shard folder or brace pattern")
    v.add_argument("--workers", type=int, default=1, help="processes scanning shards in parallel")
    v.add_argument("--json", help="also write the problems as JSON")
    v.add_argument("--caption-key", default="txt")
    v.add_argument("--image-keys", default="jpg;jpeg;png;webp")
    v.set_defaults(run=run_validate)
    f = dsub.add_parser("filter", help="dedup, caption rules, image-text similarity -> new shards")
    f.add_argument("shards", help="shard folder or brace pattern")
    f.add_argument("--out", required=True, help="output folder")
    _caption_rule_flags(f)
    g = f.add_argument_group("image-text similarity (DataComp-style)")
    g.add_argument("--model", help="run folder, checkpoint, recipe .yaml or module:function")
    g.add_argument("--min-similarity", type=float, help="keep pairs with cosine similarity >= this")
    g.add_argument("--top-fraction", type=float, help="keep this fraction of best-scoring pairs")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--device", help="default: the model's device")
    f.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    f.set_defaults(run=run_filter)


# ---------------------------------------------------------------------------- build


def _rules(args: argparse.Namespace):
    from clipkit.data.captions import CaptionRules, load_blocklist

    block = frozenset()
    if getattr(args, "blocklist", None):
        if not Path(args.blocklist).is_file():
            raise ClipkitError(f"--blocklist {args.blocklist}: no such file")
        block = load_blocklist(args.blocklist)
    lim = {k: getattr(args, k, None) or 0 for k in ("min_words", "max_words", "min_chars", "max_chars")}
    return CaptionRules(blocklist=block, **lim)


def _build_options(args: argparse.Namespace):
    from clipkit.data.build import BuildOptions
    from clipkit.data.download import USER_AGENT, Fetcher
    from clipkit.data.imageops import ImageOptions

    a = {k: (d if getattr(args, k) is None else getattr(args, k)) for k, d in BUILD_DEFAULTS.items()}
    try:
        image = ImageOptions(a["resize"], a["max_side"], a["min_side"], a["format"], a["quality"])
        fetch = Fetcher(timeout=a["timeout"], retries=a["retries"], user_agent=a["user_agent"] or USER_AGENT)
        return BuildOptions(
            shard_size=a["shard_size"], prefix=a["prefix"], image=image, captions=a["captions"],
            require_caption=not a["allow_missing_caption"], rules=_rules(args), dedup=a["dedup"],
            threads=a["threads"], fetch=fetch, incremental=a["incremental"],
        )  # fmt: skip
    except ValueError as e:
        raise ClipkitError(str(e)) from None


def _print_shard(info: dict) -> None:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(info["errors"].items(), key=lambda kv: -kv[1]))
    done = " (kept from an earlier run)" if info["reused"] else ""
    print(f"{info['shard']}: {info['ok']}/{info['items']} items ok, {info['samples']} samples"
          f"{'; dropped: ' + errors if errors else ''}{done}", file=sys.stderr, flush=True)  # fmt: skip


def _run_bundled(args: argparse.Namespace) -> int:
    """``clipkit data build NAME --out DIR``: the builder registered as NAME in data_tools/."""
    import data_tools
    from clipkit.data.builders import BUILDERS, run_builder
    from clipkit.registry import UnknownNameError

    data_tools.load_builders()
    try:
        BUILDERS.get(args.source)
    except UnknownNameError as e:
        raise ClipkitError(
            f"source '{args.source}' is not a folder, a file or a bundled source: {e}"
        ) from None
    given = [k for k in BUILD_DEFAULTS if getattr(args, k) is not None]
    if given:
        raise ClipkitError(
            f"bundled source '{args.source}' takes only --out, not --{given[0].replace('_', '-')}"
        )
    counts = run_builder(args.source, args.out)
    print(json.dumps({"source": args.source, "out": args.out, "counts": counts}, indent=2))
    return 0


def run_build(args: argparse.Namespace) -> int:
    # A bare name that is no path (no folder part, no suffix) names a bundled source.
    if not Path(args.source).exists() and re.fullmatch(r"[A-Za-z0-9][\w-]*", args.source):
        return _run_bundled(args)
    from clipkit.data.build import build_shards
    from clipkit.data.sources import open_source

    if args.address is not None and args.engine != "ray":
        raise ClipkitError("--address names a Ray cluster: add --engine ray")
    opts = _build_options(args)
    splits = [s.strip() for s in args.split.split(",") if s.strip()] if args.split else None
    kind, items = open_source(
        args.source, image_col=args.image_col, caption_cols=args.caption_col or (), root=args.root,
        splits=splits, caption_ext=args.caption_ext or "txt",
    )  # fmt: skip
    if args.engine == "ray":
        from clipkit.data.engines.ray_build import build_shards_ray

        stats = build_shards_ray(items, args.out, opts, source=str(args.source), progress=_print_shard,
                                 address=args.address)  # fmt: skip
    else:
        stats = build_shards(items, args.out, opts, source=str(args.source), progress=_print_shard)
    errors = ", ".join(f"{k} {v}" for k, v in stats["errors"].items()) or "none"
    print(f"{kind} '{args.source}': {stats['items']} items, {stats['ok']} ok -> {stats['samples']} samples "
          f"in {stats['shards']} shards under {args.out}; dropped: {errors} (details: <shard>.parquet, _stats.json)")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------- inspect / validate


def run_inspect(args: argparse.Namespace) -> int:
    from clipkit.data.atomic import atomic_write_text
    from clipkit.data.inspect import format_report, inspect_shards, write_preview

    found = inspect_shards(args.shards, preview=args.preview, seed=args.seed, caption_key=args.caption_key,
                           limit=args.limit)  # fmt: skip
    print(format_report(found))
    if args.preview > 0 and found.preview:
        folder = Path(args.shards) if Path(args.shards).is_dir() else Path(next(iter(found.shards))).parent
        path = write_preview(found, args.preview_out or folder / "_preview.png")
        print(f"preview of {len(found.preview)} random samples: {path}")
    if args.json:
        atomic_write_text(args.json, json.dumps(found.to_dict(), indent=1))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from clipkit.data.atomic import atomic_write_text
    from clipkit.data.validate import validate_shards

    report = validate_shards(args.shards, args.caption_key, args.image_keys, args.workers)
    for problem in report.problems:
        print(problem)
    print(report.summary(), file=sys.stderr if report.problems else sys.stdout)
    if args.json:
        rows = [p.__dict__ for p in report.problems]
        atomic_write_text(args.json, json.dumps({"summary": report.summary(), "problems": rows}, indent=1))
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------- filter


def run_filter(args: argparse.Namespace) -> int:
    from clipkit.data.filters import FilterOptions, filter_shards

    scorer = None
    if args.model:
        from clipkit.models.embed import SimilarityScorer
        from clipkit.models.specs import load_model

        scorer = SimilarityScorer(load_model(args.model), args.batch_size, args.device)
    elif args.min_similarity is not None or args.top_fraction is not None:
        raise ClipkitError("--min-similarity / --top-fraction need --model")
    try:
        opts = FilterOptions(rules=_rules(args), dedup=bool(args.dedup), scorer=scorer,
                             min_similarity=args.min_similarity, top_fraction=args.top_fraction,
                             batch_size=args.batch_size)  # fmt: skip
        stats = filter_shards(args.shards, args.out, opts, shard_size=args.shard_size)
    except ValueError as e:
        raise ClipkitError(str(e)) from None
    removed = ", ".join(f"{k} {v}" for k, v in stats["removed"].items()) or "none"
    print(f"kept {stats['kept']} of {stats['samples_in']} samples in {stats['shards']} shards under {args.out}; "
          f"removed: {removed} (details: _filter_status.parquet, _stats.json)")  # fmt: skip
    return 0
