"""``clipkit index {embed,build,merge,query,serve}``: search indexes over a collection.

clipkit index embed --model runs/lit_emoji --shards 'data/emoji/val/*.tar' --out data/idx/emb
clipkit index embed --model runs/lit_emoji --shards 'data/emoji/val/*.tar' --out data/idx/emb --engine ray
clipkit index build data/idx/emb --out data/idx/index --memory 512MB --target-recall 0.95
clipkit index build data/idx/emb --out data/idx/big --key IVF65536,PQ64 --memory 8G --partitions 64 --engine ray
clipkit index merge data/idx/a data/idx/b --out data/idx/ab [--memory 8G]
clipkit index query data/idx/index --text "a red heart" --k 5 [--json]
clipkit index serve data/idx/index --port 8000
"""

from __future__ import annotations

import argparse
import json
import sys

from clipkit.errors import ClipkitError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="embed a collection, build / merge / query / serve a FAISS index")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="{embed,build,merge,query,serve}")

    e = isub.add_parser("embed", help="embed shards, an image folder or a manifest (resumable)")
    _model_args(e, required=True)
    e.add_argument("--shards", default="", help="shard spec, e.g. 'data/x/train-{000000..000009}.tar'")
    e.add_argument("--folder", default="", help="folder of image files (captions from sibling .txt)")
    e.add_argument("--manifest", default="", help=".csv/.tsv/.parquet/.jsonl with a 'path' column")
    e.add_argument("--out", required=True, help="output folder (resumes an unfinished export there)")
    e.add_argument("--modality", choices=["image", "text"], default="image", help="embed images or captions")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored vector type")
    e.add_argument("--part-size", type=int, default=10_000, help="files per part (folder / manifest)")
    e.add_argument("--on-error", choices=["skip", "raise"], default="skip", help="bad samples: count or stop")
    e.add_argument("--caption-key", default="txt")
    e.add_argument("--image-keys", default="jpg;jpeg;png;webp")
    e.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (or torchrun ranks); ray: Ray actors, each holding the model "
                   "(pip install 'clipkit[ray]'); same output")  # fmt: skip
    e.add_argument("--address", default=None, help="--engine ray: the cluster (e.g. auto, HOST:6379, "
                   "ray://HOST:10001; default $RAY_ADDRESS, else a local cluster)")  # fmt: skip
    e.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G",
                   help="--engine ray: GPUs per model copy (e.g. 1, or 0.5 for two per GPU; default 0: CPUs)")  # fmt: skip
    e.set_defaults(run=run_embed)

    b = isub.add_parser("build", help="choose, train, fill and tune an index for a memory budget")
    b.add_argument("embeddings", help="output folder of `clipkit index embed`")
    b.add_argument("--out", required=True)
    b.add_argument("--memory", default="512MB", help="memory budget of the loaded index (e.g. 512MB, 2G)")
    b.add_argument("--target-recall", type=float, default=0.95, help="recall@k to tune for")
    b.add_argument("--k", type=int, default=10)
    b.add_argument("--queries", default=None, help="held-out query vectors (.npy); default: a sample")
    b.add_argument("--n-queries", type=int, default=1000)
    b.add_argument("--key", default=None, help="force an index key (e.g. IVF4096,SQ8) instead of choosing")
    b.add_argument("--trained", default=None, help="reuse this build folder's trained index (for merging)")
    b.add_argument("--threads", type=int, default=0, help="FAISS threads (0: all cores)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--partitions", type=int, default=1, help="add IVF vectors in this many parallel tasks")
    b.add_argument("--workers", type=int, default=0, help="partition tasks at once (0: one per core)")
    b.add_argument("--engine", choices=["local", "ray"], default="local", help="run partitions in a local "
                   "process pool or on Ray (pip install 'clipkit[ray]')")  # fmt: skip
    b.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    b.set_defaults(run=run_build)

    m = isub.add_parser("merge", help="join index folders built on separate parts")
    m.add_argument("folders", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument("--memory", default=None, help="put IVF lists on disk when the parts exceed this")
    m.set_defaults(run=run_merge)

    q = isub.add_parser("query", help="search an index with text, an image or a batch file")
    q.add_argument("index")
    q.add_argument("--text", default=None)
    q.add_argument("--image", default=None, help="image file")
    q.add_argument("--batch", default=None, help="text file (one query a line) or .jsonl of {text|image}")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _model_args(q, required=False)
    q.set_defaults(run=run_query)

    s = isub.add_parser("serve", help="HTTP JSON API and search page over an index")
    s.add_argument("index")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-k", type=int, default=100)
    s.add_argument("--max-body", default="8MB", help="largest accepted request body")
    s.add_argument("--verbose", action="store_true", help="log every request")
    _model_args(s, required=False)
    s.set_defaults(run=run_serve)


def _model_args(p: argparse.ArgumentParser, required: bool) -> None:
    default = "" if required else " (default: the model recorded in the index)"
    p.add_argument(
        "--model",
        required=required,
        help="run folder, checkpoint, open_clip:<config>[@<weights>], hf-clip:<dir>, recipe .yaml or "
        "module:function" + default,
    )
    p.add_argument("--override", action="append", default=[], help="model config key=value (repeatable)")


def run_embed(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from clipkit.index.embed import embed_collection
    from clipkit.index.sources import open_source
    from clipkit.index.store import finish
    from clipkit.models.specs import load_model

    source = open_source(
        shards=args.shards,
        folder=args.folder,
        manifest=args.manifest,
        part_size=args.part_size,
        caption_key=args.caption_key,
        image_keys=args.image_keys,
    )
    if args.engine == "ray":
        return _run_embed_ray(args, source)
    if args.address is not None or args.gpus_per_actor:
        raise ClipkitError("--address and --gpus-per-actor are for the Ray engine: add --engine ray")
    state = PartialState()  # rank / world size from torchrun or accelerate launch
    model = load_model(args.model, args.override, state.device)
    config, parts = embed_collection(
        model,
        source,
        args.out,
        model_name=model.resolved,
        model_overrides=args.override,
        modality=args.modality,
        batch_size=args.batch_size,
        dtype=args.dtype,
        on_error=args.on_error,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        info = finish(args.out, config, parts)
        print(
            f"{info['rows']} embeddings of width {info['dim']} in {args.out}; skipped: {info['skipped'] or 'none'}"
        )
    return 0


def _run_embed_ray(args: argparse.Namespace, source) -> int:
    from clipkit.index.ray_embed import embed_collection_ray
    from clipkit.index.store import finish

    config, parts = embed_collection_ray(
        args.model, source, args.out, model_overrides=args.override, modality=args.modality,
        batch_size=args.batch_size, dtype=args.dtype, on_error=args.on_error,
        gpus_per_actor=args.gpus_per_actor, address=args.address,
    )  # fmt: skip
    info = finish(args.out, config, parts)
    print(
        f"{info['rows']} embeddings of width {info['dim']} in {args.out}; skipped: {info['skipped'] or 'none'}"
    )
    return 0


def run_build(args: argparse.Namespace) -> int:
    import faiss

    from clipkit.index.build import build_index
    from clipkit.index.partition import FillPlan

    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    r = build_index(
        args.embeddings,
        args.out,
        memory=args.memory,
        target_recall=args.target_recall,
        k=args.k,
        n_queries=args.n_queries,
        queries=args.queries,
        key=args.key,
        trained=args.trained,
        seed=args.seed,
        fill_plan=FillPlan(args.partitions, args.workers, args.engine, args.address),
    )
    recall = r[f"recall_at_{r['k']}"]
    disk = f" (lists on disk: {r['ivfdata']})" if r.get("ivfdata") else ""
    print(
        f"{r['index_key']} {r['search_params']}: recall@{r['k']} {recall}, "
        f"{r['qps_batch1']:.0f} q/s (batch 1), {r['qps_batch1000']:.0f} q/s (batch {r['batch_of_many']}), "
        f"{(r['size_bytes'] + r.get('ivfdata_bytes', 0)) / 2**20:.1f} MiB{disk}, "
        f"built in {r['build_time_s']:.1f} s -> {args.out}"
    )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from clipkit.index.merge import merge_indexes

    merge_indexes(args.folders, args.out, memory=args.memory)
    return 0


def _open(args: argparse.Namespace):
    from clipkit.index.query import query_model
    from clipkit.index.search import SearchIndex

    index = SearchIndex(args.index)
    model = query_model(index, args.model, args.override)
    return index, model, model.resolved


def run_query(args: argparse.Namespace) -> int:
    from clipkit.index.query import format_table, read_queries, run_queries

    queries = read_queries(text=args.text, image=args.image, batch=args.batch)
    index, model, _ = _open(args)
    results = run_queries(index, model, queries, args.k)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print(format_table(results))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from clipkit.index.choose import parse_memory
    from clipkit.index.server import App, make_server

    index, model, name = _open(args)
    app = App(index, model, name, max_k=args.max_k, max_body=parse_memory(args.max_body))
    server = make_server(app, args.host, args.port, verbose=args.verbose)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host}: anyone who can reach it can query this index",
            file=sys.stderr,
        )
    print(
        f"serving {index.ntotal} vectors ({index.report.get('index_key')}) on http://{args.host}:{server.server_port}/"
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
