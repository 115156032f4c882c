"""Where a clipkit training step's time goes: the ``small`` setup of train_throughput.py, timed by phase.

Builds the run exactly as ``clipkit train`` does (``clipkit.training.loop.setup`` with the overrides
train_throughput.py gives clipkit), then times each phase of ``--steps`` optimizer steps with
manual timers (wall clock, one process, the loader workers running beside it):

    data         waiting for the next batch (decoding in the loader workers overlaps the step)
    image fwd    model.encode_image            text fwd    model.encode_text
    loss fwd     the contrastive loss          loss bwd    backward from the loss to the two embeddings
    image bwd    backward through the vision tower and head
    text bwd     backward through the text tower and head
    clip         gradient norm + clipping      optimizer   AdamW step (+ schedule, zero_grad)
    log          the per-step bookkeeping of the loop at train.log_every=1 (embedding stats, scalars
                 read to the host, metrics.csv / TensorBoard row)

The backward is run in three parts (loss -> embeddings, then each tower from its embedding's
gradient); the gradients are those of one backward (a sum of the parts). The first ``--skip``
steps are left out. With ``--torch-profiler`` the heaviest operators (self CPU time) are printed too.

    .venv/bin/python benchmarks/train_profile.py --model ViT-S-32-alt --threads 2 --workers 2
    .venv/bin/python benchmarks/train_profile.py --model clipkit-tiny-ViT --image-size 32 --context-length 16
    .venv/bin/python benchmarks/train_profile.py ... --full-text --set optim.implementation=for_loop  # levers off
    .venv/bin/python benchmarks/train_profile.py ... --set train.precision=auto
    .venv/bin/python benchmarks/train_profile.py ... --no-pooled-block --no-packing
    .venv/bin/python benchmarks/train_profile.py ... --no-pooled-block --no-length-groups
    CLIPKIT_MALLOC=default .venv/bin/python benchmarks/train_profile.py ...  # glibc's malloc defaults

``--set key=value`` adds clipkit overrides (the speed levers can be switched off one by one);
``--no-pooled-block`` runs the last vision and text blocks on every row (``clipkit.models.pooled_block``
off), ``--no-packing`` runs the text padded, in length groups (``clipkit.models.text_padding``'s
packed blocks off), ``--no-length-groups`` cuts the whole batch to its longest caption in one
group (packing and ``clipkit.models.text_padding.length_groups`` off) and ``CLIPKIT_MALLOC=default`` leaves glibc's
malloc as it is (``clipkit.allocator``). The heading also gives the main process's page faults and
system time over the timed steps. ``benchmarks/step_levers.py`` runs these one by one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _record

PHASES = (
    "data",
    "image fwd",
    "text fwd",
    "loss fwd",
    "loss bwd",
    "image bwd",
    "text bwd",
    "clip",
    "optimizer",
    "log",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-S-32-alt", help="open_clip model config (both towers)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", default="", help="shard glob (default: the emoji training shards)")
    p.add_argument("--set", action="append", default=[], help="extra clipkit override key=value")
    p.add_argument(
        "--full-text",
        action="store_true",
        help="text tower on the full context (no cut to the longest caption)",
    )
    p.add_argument(
        "--no-pooled-block",
        action="store_true",
        help="last vision / text block on every row (clipkit.models.pooled_block off)",
    )
    p.add_argument(
        "--no-packing",
        action="store_true",
        help="text padded, in length groups (text_padding's packed blocks off)",
    )
    p.add_argument(
        "--no-length-groups",
        action="store_true",
        help="text cut to the batch's longest caption in one group (packing and text_padding.length_groups off)",
    )
    p.add_argument("--torch-profiler", action="store_true", help="also print the top operators")
    p.add_argument("--out", default="", help="also append the table (markdown) to this file")
    _record.add_record_flag(p, "allow --out to be a tracked file (e.g. benchmarks/RESULTS.md)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_run(args: argparse.Namespace, run_dir: Path):  # -> clipkit.training.loop.Run
    import glob

    from _throughput_clipkit import clipkit_overrides
    from _throughput_common import EMOJI_TRAIN_GLOB, ROOT, Hparams, Setup

    from clipkit.config import load_config
    from clipkit.training.loop import setup

    shards = sorted(glob.glob(args.shards or str(ROOT / EMOJI_TRAIN_GLOB)))
    if not shards:
        raise SystemExit(
            "no shards; build them (python -m data_tools.build_emoji --out data/emoji) or --shards"
        )
    samples = args.batch_size * (args.steps + 1)
    st = Setup(
        "small", shards, 0, args.batch_size, samples, 1, Hparams(warmup_steps=10), args.threads,
        args.workers, open_clip_model=args.model, small_image_size=args.image_size,
        small_context_length=args.context_length,
    )  # fmt: skip
    overrides = clipkit_overrides(st, run_dir, "profile") + ["train.stall_timeout_s=0", *args.set]
    cfg = load_config(None, overrides + [f"train.threads={args.threads}"])
    return setup(cfg)


def timed_step(run, clock: dict[str, float]) -> None:
    """One optimizer step of ``run``, phase by phase (same math as loop.train_step, one micro-batch)."""
    import torch

    from clipkit.training import loop
    from clipkit.training.report import add_to_window, log, reset_window

    def tick(name: str, t0: float) -> float:
        t1 = time.perf_counter()
        clock[name] += t1 - t0
        return t1

    model, acc = run.model, run.acc
    t = time.perf_counter()
    micro = loop.next_micro_batches(run)
    batch = loop.to_device(micro[0][0], acc.device)
    t = tick("data", t)
    model.train()
    with acc.autocast():
        img = model.encode_image(image=batch["image"])
        t = tick("image fwd", t)
        txt = model.encode_text(batch["text"])
        t = tick("text fwd", t)
        scale = model.logit_scale.clamp(max=model.max_logit_scale).exp()
        out = {"image_emb": img, "text_emb": txt, "logit_scale": scale}
        losses = run.loss_fn(out, batch)
    t = tick("loss fwd", t)
    g_img, g_txt, g_scale = torch.autograd.grad(losses["loss"], [img, txt, scale], retain_graph=False)
    t = tick("loss bwd", t)
    img.backward(g_img)
    t = tick("image bwd", t)
    torch.autograd.backward([txt, scale], [g_txt, g_scale])
    t = tick("text bwd", t)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    grad_norm = acc.clip_grad_norm_(params, run.cfg.optim.grad_clip or math.inf)
    t = tick("clip", t)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    t = tick("optimizer", t)
    from clipkit.losses.stats import embedding_stats

    result = {k: float(v.detach()) for k, v in losses.items() if torch.is_tensor(v) and v.numel() == 1}
    result.update(grad_norm=float(grad_norm), logit_scale=float(scale.detach()), nonfinite=0.0, overflow=0.0)
    result.update(
        {k: float(v) for k, v in embedding_stats(img.detach().float(), txt.detach().float()).items()}
    )
    run.step += 1
    run.samples_seen += len(micro[0][1])
    add_to_window(run, result, len(micro[0][1]))
    log(run, result)
    reset_window(run)
    tick("log", t)


def switch_levers(run, args: argparse.Namespace) -> None:
    """Turn off the speed levers that ``--no-pooled-block`` / ``--no-packing`` /
    ``--no-length-groups`` name."""
    text = "one group" if args.no_length_groups else "groups" if args.no_packing else "packed"
    set_levers(run, pooled=not args.no_pooled_block, text=text)


TEXT_LAYOUTS = ("packed", "groups", "one group")


def set_levers(run, pooled: bool, text: str = "packed") -> None:
    """Switch the pooled last blocks of ``run``'s model on (as clipkit built it) or off, and run
    its text ``packed`` (as built, where the tower packs), padded in length ``groups``, or padded
    in ``one group`` cut to the longest caption; either way and as often as asked
    (step_levers.py alternates them)."""
    if text not in TEXT_LAYOUTS:
        raise ValueError(f"text layout {text!r}: one of {TEXT_LAYOUTS}")
    from clipkit.models import text_padding

    model = run.acc.unwrap_model(run.model)
    vision, tower = model.vision, model.text
    built = run.__dict__.setdefault("_levers_as_built", {})
    if not built:
        built["vision"] = getattr(vision, "pooled_last_block", None)
        built["overhead"] = text_padding.GROUP_OVERHEAD_TOKENS
        for owner, attr in ((tower, "causal_text"), (getattr(tower, "model", None), "causal")):
            if getattr(owner, attr, None) is not None:
                built["text"] = (owner, attr, getattr(owner, attr))
    if built["vision"] is not None:
        vision.pooled_last_block = built["vision"] and pooled
    if "text" in built:
        owner, attr, spec = built["text"]
        packed = spec.packed and text == "packed"
        setattr(
            owner,
            attr,
            dataclasses.replace(spec, pooled_last_block=spec.pooled_last_block and pooled, packed=packed),
        )
    # one group: no split is ever worth an overhead this large
    text_padding.GROUP_OVERHEAD_TOKENS = 10**9 if text == "one group" else built["overhead"]


def table(clock: dict[str, float], steps: int, batch_size: int) -> str:
    total = sum(clock.values())
    lines = ["| phase | ms / step | share |", "|---|---:|---:|"]
    for name in PHASES:
        lines.append(f"| {name} | {1000 * clock[name] / steps:.1f} | {100 * clock[name] / total:.1f}% |")
    lines.append(f"| **total** | {1000 * total / steps:.1f} | {batch_size * steps / total:.1f} samples/s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from clipkit.training.report import reset_window

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(args, Path(tmp) / "runs")
        if args.full_text:  # clipkit.models.text_padding off: every column of the context
            text = run.acc.unwrap_model(run.model).text
            text.causal_text = None
            if hasattr(text.model, "causal"):
                text.model.causal = None
        switch_levers(run, args)
        reset_window(run)
        clock: dict[str, float] = defaultdict(float)
        prof = None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(args.steps):
            if i == args.skip:
                clock.clear()
                usage = resource.getrusage(resource.RUSAGE_SELF)
                if args.torch_profiler:
                    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    prof.__enter__()
            timed_step(run, clock)
        end = resource.getrusage(resource.RUSAGE_SELF)
        if prof is not None:
            prof.__exit__(None, None, None)
        run.metrics.close()
    from clipkit import allocator

    timed = args.steps - args.skip
    faults, sys_s = (end.ru_minflt - usage.ru_minflt) / timed, (end.ru_stime - usage.ru_stime) / timed
    head = (
        f"model {args.model} @ {args.image_size}px, context {args.context_length}, batch {args.batch_size}, "
        f"threads {args.threads}, workers {args.workers}, overrides {args.set or 'none'}, "
        f"text {'full context' if args.full_text else 'cut to the longest caption'}, "
        f"precision {run.cfg.train.precision}, pooled last block {'off' if args.no_pooled_block else 'on'}, "
        f"text {'one group' if args.no_length_groups else 'in length groups' if args.no_packing else 'packed'}, allocator: {allocator.state()}, "
        f"load avg {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n\n"
        f"page faults {faults:.0f} / step, system time {1000 * sys_s:.0f} ms / step (main process)"
    )
    text = f"{head}\n\n{table(clock, args.steps - args.skip, args.batch_size)}\n"
    print(text)
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.out:  # a tracked file only with --record (benchmarks/_record.py)
        _record.append_text(args.out, text + "\n", record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
