"""clipkit eval against CLIP_benchmark's ``clip_benchmark eval``: same model, same data, same numbers.

One open_clip model (the config ``clipkit-tiny-ViT`` with fixed random weights, seed 0, saved to
a file both tools load) is evaluated by both tools on two datasets in CLIP_benchmark's local
webdataset layout:

* zero-shot classification: the first ``--zeroshot-shards`` shards of Animal-MNIST
  (``data/animal_mnist``, 1,000 images each, 10 classes, 8 prompts);
* retrieval with several captions per image: ``--retrieval-images`` emoji images (emoji val,
  then train) with 2 or 3 captions each (the emoji name, "an emoji of <name>", "<name> icon"),
  one caption per line of the ``.txt`` member.

Each tool runs each task as its own process, as a user would: ``clip_benchmark eval ... --task
zeroshot_classification`` / ``zeroshot_retrieval --recall_k 1 5 10`` (in ``.venv-clipbench``
through ``_clipbench_runner.py``, which registers the tiny config with open_clip first) and
``clipkit eval zeroshot`` / ``clipkit eval retrieval``; both with batch size 64, no loader workers,
fp32 (``--no_amp``), and CLIP_benchmark's decoding of transparent images (``--alpha drop``:
CLIP_benchmark drops alpha rather than compositing it). Wall and CPU times are whole
processes (start-up, imports, model load, data, metrics), medians over ``--repeats``
interleaved rounds. Every metric must agree to 4 decimals; target: clipkit wall <= 0.8 x.

    bash benchmarks/setup_clipbench_env.sh          # once: .venv-clipbench (CLIP_benchmark 1.6.2)
    .venv/bin/python benchmarks/eval_parity.py      # prints the table, appends to RESULTS.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS_MD = BENCH / "RESULTS.md"
CLIPKIT = ROOT / ".venv" / "bin" / "clipkit"
CB_PY = ROOT / ".venv-clipbench" / "bin" / "python"
CONFIG = "clipkit-tiny-ViT"
CONFIG_DIR = ROOT / "clipkit" / "models" / "open_clip_configs"
TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}


# ----------------------------------------------------------------------------- data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def zeroshot_set(out: Path, shards: int) -> Path:
    """The first ``shards`` Animal-MNIST shards as their own CLIP_benchmark folder."""
    src = ROOT / "data" / "animal_mnist"
    if not (src / "test" / "nshards.txt").is_file():
        subprocess.run(
            [sys.executable, "-m", "data_tools.build_animal_mnist", "--out", str(src)], check=True, cwd=ROOT
        )
    dst = out / "animal_mnist"
    (dst / "test").mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        shutil.copyfile(src / "test" / f"{i}.tar", dst / "test" / f"{i}.tar")
    (dst / "test" / "nshards.txt").write_text(f"{shards}\n")
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        shutil.copyfile(src / name, dst / name)
    (dst / "dataset_type.txt").write_text("classification\n")
    return dst


def _emoji_samples() -> list[tuple[str, bytes, str]]:
    from clipkit.evaluation.datasets import iter_tar_samples

    src = ROOT / "data" / "emoji"
    if not (src / "val").is_dir():
        subprocess.run(
            [sys.executable, "-m", "data_tools.build_emoji", "--out", str(src)], check=True, cwd=ROOT
        )
    out = []
    for split in ("val", "train"):
        for shard in sorted((src / split).glob("*.tar")):
            out += [(s["__key__"], s["png"], s["txt"].decode()) for s in iter_tar_samples(shard)]
    return out


def retrieval_set(out: Path, n_images: int, per_shard: int = 500) -> Path:
    """``n_images`` emoji PNGs (RGBA kept) with 2 or 3 captions each, CLIP_benchmark layout."""
    dst = out / "emoji_multicap"
    (dst / "test").mkdir(parents=True, exist_ok=True)
    samples = _emoji_samples()[:n_images]
    shards = 0
    for start in range(0, len(samples), per_shard):
        with tarfile.open(dst / "test" / f"{shards}.tar", "w") as tar:
            for i, (key, png, name) in enumerate(samples[start : start + per_shard], start):
                captions = [name, f"an emoji of {name}", f"{name} icon"][: 2 + i % 2]
                _add(tar, f"{key}.png", png)
                _add(tar, f"{key}.txt", "\n".join(captions).encode())
        shards += 1
    (dst / "test" / "nshards.txt").write_text(f"{shards}\n")
    (dst / "dataset_type.txt").write_text("retrieval\n")
    return dst


def weights_file(out: Path) -> Path:
    path = out / f"{CONFIG}-seed0.pt"
    if not path.is_file():
        code = (
            "import sys, torch, open_clip; open_clip.add_model_config(sys.argv[1]); torch.manual_seed(0); "
            "torch.save(open_clip.create_model(sys.argv[2]).state_dict(), sys.argv[3])"
        )
        subprocess.run(
            [str(ROOT / ".venv/bin/python"), "-c", code, str(CONFIG_DIR), CONFIG, str(path)], check=True
        )
    return path


# ----------------------------------------------------------------------------- runs


def clipbench_cmd(task: str, data: Path, weights: Path, result: Path, args: argparse.Namespace) -> list[str]:
    cmd = [str(CB_PY), str(BENCH / "_clipbench_runner.py"), "--config-dir", str(CONFIG_DIR), "--"]
    cmd += ["eval", "--dataset", f"wds/{data.name}", "--dataset_root", str(data), "--model", CONFIG]
    cmd += ["--pretrained", str(weights), "--task", TASKS[task], "--output", str(result)]
    cmd += ["--batch_size", str(args.batch_size), "--num_workers", str(args.workers), "--no_amp", "--quiet"]
    return cmd + (["--recall_k", "1", "5", "10"] if task == "retrieval" else [])


def clipkit_cmd(task: str, data: Path, weights: Path, out: Path, args: argparse.Namespace) -> list[str]:
    cmd = [str(CLIPKIT), "eval", task, "--model", f"open_clip:{CONFIG}@{weights}", "--dataset", str(data)]
    cmd += ["--alpha", "drop", "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    return cmd + ["--output", str(out)]


def timed(cmd: list[str], log: Path, threads: int = 0) -> tuple[float, float]:
    """(wall s, CPU s of the process and its children); raises with the log tail on failure.

    ``threads`` > 0 sets OMP_NUM_THREADS (torch's intra-op threads at start-up) for the run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd,
            check=False,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
        )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _env(threads: int) -> dict[str, str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def compare(cb: dict, ck: dict) -> list[dict]:
    rows = []
    for key, want in cb["metrics"].items():
        got = ck["metrics"].get(key)
        same = got is not None and round(got, 4) == round(want, 4)
        rows.append({"task": cb["task"], "metric": key, "clip_benchmark": want, "clipkit": got, "same": same})
    return rows


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zeroshot-shards", type=int, default=3, help="Animal-MNIST shards of 1,000 images")
    p.add_argument("--retrieval-images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for both tools (OMP_NUM_THREADS, and clipkit --threads); 0 = each tool's default",
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "eval_parity"))
    p.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS_MD.name}")
    return p.parse_args(argv)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not CB_PY.exists():
        subprocess.run(["bash", str(BENCH / "setup_clipbench_env.sh")], check=True)
    out = Path(args.out)
    shutil.rmtree(out / "data", ignore_errors=True)
    data = {"zeroshot": zeroshot_set(out / "data", args.zeroshot_shards)}
    data["retrieval"] = retrieval_set(out / "data", args.retrieval_images)
    weights = weights_file(out)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    results: dict[tuple[str, str], dict] = {}
    for rep in range(args.repeats):
        tools = ["clip_benchmark", "clipkit"] if rep % 2 == 0 else ["clipkit", "clip_benchmark"]
        for tool in tools:
            for task in TASKS:
                run_dir = out / "runs" / f"{tool}-{task}-{rep}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                if tool == "clip_benchmark":
                    cmd = clipbench_cmd(task, data[task], weights, run_dir / "result.json", args)
                else:
                    cmd = clipkit_cmd(task, data[task], weights, run_dir, args)
                wall, cpu = timed(cmd, run_dir / "log.txt", args.threads)
                times.setdefault((tool, task), []).append((wall, cpu))
                found = sorted(run_dir.rglob("*.json"))
                results[(tool, task)] = json.loads(found[0].read_text())
                print(
                    f"round {rep + 1}/{args.repeats} {tool:14s} {task:9s} wall {wall:6.1f} s  cpu {cpu:6.1f} s",
                    flush=True,
                )
    report = summarize(args, times, results, data, weights)
    print(report)
    if not args.no_record:
        with open(RESULTS_MD, "a") as f:
            f.write(report)
    return 0


def summarize(args, times, results, data, weights) -> str:
    cmd = "python benchmarks/eval_parity.py " + " ".join(sys.argv[1:])
    lines = [f"\n## {datetime.now().isoformat(timespec='seconds')}: clipkit eval vs CLIP_benchmark 1.6.2\n"]
    lines += ["```", cmd.strip(), "```", ""]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    lines.append(
        f"machine: {os.cpu_count()} cpus (shared; load avg at the end {load}), python {platform.python_version()}, "
        f"CPU only; model open_clip `{CONFIG}` (fixed random weights `{weights.name}`, seed 0); "
        f"zero-shot: {args.zeroshot_shards * 1000} Animal-MNIST images, 10 classes x 8 prompts; retrieval: "
        f"{args.retrieval_images} emoji images x 2-3 captions; batch {args.batch_size}, {args.workers} loader workers, "
        f"torch threads: {args.threads or 'each tool default (CLIP_benchmark: all cores; clipkit: auto, idle cores)'}, "
        f"fp32, alpha dropped (CLIP_benchmark's decoding); medians of {args.repeats} interleaved rounds, "
        "one process per (tool, task), times of whole processes.\n"
    )
    lines += [
        "| task | CLIP_benchmark wall s | clipkit wall s | ratio wall | CLIP_benchmark CPU s | clipkit CPU s | ratio CPU |"
    ]
    lines += ["|---|---|---|---|---|---|---|"]
    tot = {"clip_benchmark": [0.0, 0.0], "clipkit": [0.0, 0.0]}
    for task in TASKS:
        cb_w, cb_c = (_median([t[i] for t in times[("clip_benchmark", task)]]) for i in (0, 1))
        ck_w, ck_c = (_median([t[i] for t in times[("clipkit", task)]]) for i in (0, 1))
        tot["clip_benchmark"][0] += cb_w
        tot["clip_benchmark"][1] += cb_c
        tot["clipkit"][0] += ck_w
        tot["clipkit"][1] += ck_c
        lines.append(
            f"| {task} | {cb_w:.1f} | {ck_w:.1f} | {ck_w / cb_w:.2f} | {cb_c:.1f} | {ck_c:.1f} | {ck_c / cb_c:.2f} |"
        )
    (cbw, cbc), (ckw, ckc) = tot["clip_benchmark"], tot["clipkit"]
    lines.append(
        f"| **both** | {cbw:.1f} | {ckw:.1f} | **{ckw / cbw:.2f}** | {cbc:.1f} | {ckc:.1f} | {ckc / cbc:.2f} |"
    )
    verdict = "met" if ckw / cbw <= 0.8 else "NOT met"
    lines += ["", f"Target clipkit wall <= 0.8 x CLIP_benchmark's: {verdict} ({ckw / cbw:.2f}).", ""]
    rows = [
        r for task in TASKS for r in compare(results[("clip_benchmark", task)], results[("clipkit", task)])
    ]
    lines += ["| task | metric | CLIP_benchmark | clipkit | same to 4 decimals |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['clip_benchmark']:.6f} | {r['clipkit']:.6f} | {'yes' if r['same'] else 'NO'} |"
        )
    ok = all(r["same"] for r in rows)
    lines += [
        "",
        f"Metric parity: {'all ' + str(len(rows)) + ' metrics equal to 4 decimals' if ok else 'MISMATCH'}.",
        "",
    ]
    lines.append(
        "Commands (per round): `"
        + " ".join(clipbench_cmd("zeroshot", data["zeroshot"], weights, Path("result.json"), args))
        + "` and `"
        + " ".join(clipkit_cmd("zeroshot", data["zeroshot"], weights, Path("OUT"), args))
        + "` (retrieval alike, with `--task zeroshot_retrieval --recall_k 1 5 10` / `clipkit eval retrieval`).\n"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
