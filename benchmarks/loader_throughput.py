"""Training-loader throughput: clipkit's ``build_loader`` against OpenCLIP's ``get_wds_dataset``.

Both pipelines do the same work on the same shards: read the tars, decode the JPEG, OpenCLIP's
224 px training transform (``RandomResizedCrop(224, scale=(0.9, 1))`` bicubic, ToTensor,
Normalize with the CLIP mean / std; the very transform object ``open_clip.image_transform_v2``
builds), tokenize the caption with ``open_clip.get_tokenizer("ViT-B-32")``, and collate
batches of 64, in train mode (shuffling), with 0 and 2 loader workers. Thread counts are set
equally: ``OMP_NUM_THREADS=MKL_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` in the main
process; loader workers run one torch thread each.

Shards: ``--samples`` realistic JPEGs (default 3,000 in 8 shards) made once from real photos
(scikit-image's bundled photographs, cropped to common aspect ratios and flipped) with an
openclipart drawing pasted on each, resized to a longest side drawn from 400-1,000 px and
encoded at JPEG quality 65-95 (a fifth with 4:4:4 chroma, a tenth progressive); captions from
the drawing's SVG title and keywords. They are cached under ``runs/bench/loader_shards``.

Each (tool, workers) run is a fresh subprocess (``_loader_runner.py``): OpenCLIP's in
``.venv-openclip`` (open_clip_train needs webdataset 0.2.86; see setup_openclip_env.sh),
clipkit's in ``.venv``. Runs alternate between the tools, ``--repeats`` times. Reported:
images/s (wall time from the first ``next()`` to the last batch) and images per CPU-second
(this process plus its loader workers), median over the repeats, and clipkit / OpenCLIP
ratios. The 2 cores here are shared with other work: wall numbers move with the load (printed
at the start and the end), CPU-second numbers much less. Target: clipkit / OpenCLIP images/s
>= 2.0 at every worker count; exit status 1 when it is missed.

    bash benchmarks/setup_openclip_env.sh                       # once
    .venv/bin/python benchmarks/loader_throughput.py --record   # ~10 min; + a section in RESULTS.md
    .venv/bin/python benchmarks/loader_throughput.py --samples 512 --repeats 1   # smoke: stdout + runs/bench/
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record

RUNNER = ROOT / "benchmarks" / "_loader_runner.py"
PYTHONS = {
    "clipkit": ROOT / ".venv" / "bin" / "python",
    "openclip": ROOT / ".venv-openclip" / "bin" / "python",
}
TARGET = 2.0  # clipkit / OpenCLIP images/s (wall), at every worker count
ASPECTS = [4 / 3, 3 / 2, 16 / 9, 1.0, 5 / 4, 3 / 4, 2 / 3, 9 / 16]


# ---------------------------------------------------------------------------- shards


def _photos() -> list[tuple[str, object]]:
    import skimage.data as d
    from PIL import Image

    named = [
        ("an astronaut", d.astronaut()), ("a cat", d.chelsea()), ("a cup of coffee", d.coffee()),
        ("a deep sky field", d.hubble_deep_field()), ("a retina", d.retina()), ("a rocket launch", d.rocket()),
        ("a motorcycle", d.stereo_motorcycle()[0]), ("a tissue sample", d.immunohistochemistry()),
        ("a cameraman", d.camera()), ("the moon", d.moon()), ("grass", d.grass()), ("gravel", d.gravel()),
    ]  # fmt: skip
    return [(name, Image.fromarray(a).convert("RGB")) for name, a in named]


def _cliparts(n: int, rng: random.Random) -> list[tuple[str, object]]:
    from PIL import Image

    from data_tools import build_openclipart as oc

    pairs = rng.sample(oc.clipart_pairs(), n)
    out = []
    for _, png, svg in pairs:
        img = Image.open(png).convert("RGBA")
        img.thumbnail((600, 600))
        out.append((oc.caption_of(*oc.svg_metadata(svg)) or "a drawing", img))
    return out


def _sample(rng: random.Random, photos: list, cliparts: list) -> tuple[bytes, str]:
    from PIL import Image, ImageOps

    name, bg = rng.choice(photos)
    aspect = rng.choice(ASPECTS)
    w, h = bg.size
    cw = min(w, int(h * aspect)) * rng.uniform(0.6, 1.0)
    ch = cw / aspect
    x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    img = bg.crop((int(x), int(y), int(x + cw), int(y + ch)))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    longest = rng.randint(400, 1000)
    scale = longest / max(img.size)
    img = img.resize(
        (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC
    )
    caption, art = rng.choice(cliparts)
    side = int(min(img.size) * rng.uniform(0.25, 0.6))
    art = art.copy()
    art.thumbnail((side, side))
    img.paste(art, (rng.randint(0, img.width - art.width), rng.randint(0, img.height - art.height)), art)
    buf = io.BytesIO()
    opts = {"quality": rng.randint(65, 95), "progressive": rng.random() < 0.1}
    if rng.random() < 0.2:
        opts["subsampling"] = 0  # 4:4:4
    img.save(buf, "JPEG", **opts)
    return buf.getvalue(), f"{caption} on a photo of {name}"


def make_shards(out: Path, samples: int, shards: int, seed: int = 0) -> str:
    """Write (or reuse) the benchmark shards; returns their brace pattern."""
    from clipkit.data import ShardWriter
    from clipkit.data.shards import read_sizes

    params = {"samples": samples, "shards": shards, "seed": seed, "version": 1}
    pattern = str(out / f"bench-{{000000..{shards - 1:06d}}}.tar")
    stamp = out / "params.json"
    if (
        stamp.is_file()
        and json.loads(stamp.read_text()) == params
        and sum(read_sizes(out).values()) == samples
    ):
        return pattern
    stamp.unlink(missing_ok=True)
    rng = random.Random(seed)
    photos, cliparts = _photos(), _cliparts(300, rng)
    per_shard = -(-samples // shards)
    with ShardWriter(out, prefix="bench", maxcount=per_shard) as w:
        for i in range(samples):
            jpg, caption = _sample(rng, photos, cliparts)
            w.write({"__key__": f"{i:06d}", "jpg": jpg, "txt": caption})
    stamp.write_text(json.dumps(params))
    return pattern


# ---------------------------------------------------------------------------- runs


def run_one(tool: str, pattern: str, samples: int, workers: int, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    cmd = [str(PYTHONS[tool]), str(RUNNER), "--tool", tool, "--shards", pattern, "--samples", str(samples),
           "--batch-size", str(batch), "--workers", str(workers), "--threads", "1"]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} workers={workers} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_avg"] = os.getloadavg()[0]
    return result


def summarise(runs: list[dict], tools: list[str], workers: list[int]) -> list[dict]:
    rows = []
    for w in workers:
        by_tool = {}
        for tool in tools:
            mine = [r for r in runs if r["tool"] == tool and r["workers"] == w]
            by_tool[tool] = {
                "wall": statistics.median(r["images_per_s"] for r in mine),
                "cpu": statistics.median(r["images_per_cpu_s"] for r in mine),
                "all_wall": [round(r["images_per_s"], 1) for r in mine],
                "images": mine[0]["images"],
            }
        for tool in tools:
            row = {"workers": w, "tool": tool, **by_tool[tool]}
            if tool == "clipkit" and "openclip" in by_tool:
                row["ratio_wall"] = by_tool["clipkit"]["wall"] / by_tool["openclip"]["wall"]
                row["ratio_cpu"] = by_tool["clipkit"]["cpu"] / by_tool["openclip"]["cpu"]
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| workers | tool | images/run | images/s (median) | runs images/s | images/CPU-s (median) | ratio images/s | ratio images/CPU-s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = (
            (f"**{r['ratio_wall']:.2f}**", f"**{r['ratio_cpu']:.2f}**") if "ratio_wall" in r else ("-", "-")
        )
        lines.append(f"| {r['workers']} | {r['tool']} | {r['images']} | {r['wall']:.1f} | {r['all_wall']} | "
                     f"{r['cpu']:.1f} | {ratio[0]} | {ratio[1]} |")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--tools", nargs="+", default=["openclip", "clipkit"], choices=["openclip", "clipkit"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(_record.RUNS / "loader_shards"))
    p.add_argument("--json", help="also save every run as JSON")
    _record.add_record_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if "openclip" in args.tools and not PYTHONS["openclip"].exists():
        sys.exit("no .venv-openclip: run `bash benchmarks/setup_openclip_env.sh` first")
    out = _record.output_dir(args.out)
    load_start = _record.load_average()
    print(f"load average at the start (1, 5, 15 min): {load_start}", flush=True)
    pattern = make_shards(out, args.samples, args.shards)
    print(f"shards: {pattern} ({args.samples} JPEGs)", flush=True)
    runs = []
    for rep in range(args.repeats):
        for w in args.workers:
            for tool in args.tools if rep % 2 == 0 else args.tools[::-1]:
                r = run_one(tool, pattern, args.samples, w, args.batch_size)
                runs.append(r)
                print(f"  {tool:8s} workers={w} rep={rep}: {r['images']} images, {r['images_per_s']:.1f}/s wall, "
                      f"{r['images_per_cpu_s']:.1f}/CPU-s (load {r['load_avg']:.1f})", flush=True)  # fmt: skip
    rows = summarise(runs, args.tools, args.workers)
    targets = _record.Targets()
    lines = [
        targets.check(f"workers={r['workers']}: clipkit >= {TARGET:g}x OpenCLIP's images/s", r["ratio_wall"] >= TARGET,
                      f"{r['ratio_wall']:.2f}x")
        for r in rows if "ratio_wall" in r
    ]  # fmt: skip
    loads = (load_start, _record.load_average())
    text = (
        table(rows) + "\n\n" + "".join(f"- {line}\n" for line in lines) + f"\nVerdict: {targets.summary()}.\n"
    )
    print(text + f"load average at the end (1, 5, 15 min): {loads[1]}", flush=True)
    if args.json:
        _record.write_text(args.json, json.dumps({"runs": runs, "summary": rows}, indent=1))
    _record.save_report("loader_throughput", section(text, argv, args, loads), args.record)
    return targets.exit_code()


def section(text: str, argv: list[str], args: argparse.Namespace, loads: tuple[str, str]) -> str:
    import torch

    title = f"Loader throughput {dt.datetime.now().isoformat(timespec='seconds')}"
    return (
        _record.heading_text(title, "loader_throughput.py", argv)
        + f"""machine: {os.cpu_count()} cpus, load average (1, 5, 15 min) {loads[0]} at the start, {loads[1]} at the end; torch {torch.__version__}, python {platform.python_version()}
work: {args.samples} JPEGs (longest side 400-1000 px) in {args.shards} shards -> RandomResizedCrop(224, scale 0.9-1, bicubic) + Normalize, open_clip ViT-B-32 tokenizer, batch {args.batch_size}, train mode; OMP/MKL/torch threads 1, workers one thread each; median of {args.repeats} runs each, tools alternating
ratio = clipkit / OpenCLIP (`open_clip_train.data.get_wds_dataset`, open_clip_torch 3.3.0, webdataset 0.2.86)

{text}"""
    )


if __name__ == "__main__":
    sys.exit(main())
