"""clipkit eval against CLIP_benchmark's ``clip_benchmark eval``: same model, same data, same numbers.

One open_clip model (the config ``clipkit-tiny-ViT`` with fixed random weights, seed 0, saved to
a file both tools load) is evaluated by both tools on two datasets in CLIP_benchmark's local
webdataset layout:

* zero-shot classification: the first ``--zeroshot-shards`` shards of Animal-MNIST
  (``data/animal_mnist``, 1,000 images each, 10 classes, 8 prompts);
* retrieval with several captions per image: ``--retrieval-images`` emoji images (emoji val,
  then train) with 2 or 3 captions each (the emoji name, "an emoji of <name>", "<name> icon"),
  one caption per line of the ``.txt`` member.

``--model demo224`` evaluates a real model instead, where the forward pass dominates: the demo's
EfficientNet-Lite0 + MiniLM at 224 px (``train/lit_emoji.yaml`` trained ``--demo-samples``
samples, seed 0; 0 = untrained heads), written once by ``clipkit export`` as an open_clip folder
that CLIP_benchmark loads as ``--model local-dir:<folder>`` and clipkit as
``open_clip:local-dir:<folder>`` (``_demo_model.py``); target clipkit wall <= 0.6 x.

Each tool runs each task as its own process, as a user would: ``clip_benchmark eval ... --task
zeroshot_classification`` / ``zeroshot_retrieval --recall_k 1 5 10`` (in ``.venv-clipbench``
through ``_clipbench_runner.py``, which registers the tiny config with open_clip first) and
``clipkit eval zeroshot`` / ``clipkit eval retrieval``; both with batch size 64, no loader workers,
fp32 (``--no_amp``), and CLIP_benchmark's decoding of transparent images (``--alpha drop``:
CLIP_benchmark drops alpha rather than compositing it). Wall and CPU times are whole
processes (start-up, imports, model load, data, metrics), medians over ``--repeats``
interleaved rounds. Targets: every metric equal to 4 decimals; clipkit wall <= 0.8 x (tiny); with
``--threads N``, both tools' processes report N torch threads. Exit status 1 when one is missed.

Threads: ``--threads N`` gives both processes ``OMP_NUM_THREADS=MKL_NUM_THREADS=N`` and
``torch.set_num_threads(N)`` (``_clipbench_runner.py --threads N``; ``clipkit eval --threads N``).
Each process prints the count torch actually ran with (``[bench-threads] torch N``, from
``_clipbench_runner.py`` and ``_clipkit_eval_runner.py``) and the summary reports those counts,
with the load average at the start and at the end.

    bash benchmarks/setup_clipbench_env.sh                    # once: .venv-clipbench (CLIP_benchmark 1.6.2)
    .venv/bin/python benchmarks/eval_parity.py --threads 2    # report to stdout and runs/bench/eval_parity/
    .venv/bin/python benchmarks/eval_parity.py --threads 2 --record   # + append it to RESULTS.md
    .venv/bin/python benchmarks/eval_parity.py --model demo224 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _demo_model
import _record

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CK_PY = ROOT / ".venv" / "bin" / "python"
CB_PY = ROOT / ".venv-clipbench" / "bin" / "python"
CONFIG = "clipkit-tiny-ViT"
CONFIG_DIR = ROOT / "clipkit" / "models" / "open_clip_configs"
TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
TOOLS = ("clip_benchmark", "clipkit")
WALL_TARGET = 0.8  # clipkit wall time / CLIP_benchmark's, both tasks together
WALL_TARGETS = {"tiny": WALL_TARGET, "demo224": 0.6}  # by --model; the real model's forward pass dominates
THREADS_LINE = re.compile(r"^\[bench-threads\] torch (\d+)$", re.MULTILINE)  # printed by both runners


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


def model_args(weights: Path) -> tuple[list[str], str]:
    """(CLIP_benchmark's ``--model``/``--pretrained``, clipkit's ``--model``) for the tiny weights file
    or, for ``--model demo224``, the export folder (open_clip's ``local-dir:``, which carries its
    preprocessing; open_clip ignores ``--pretrained`` beside it, given only as a file name)."""
    if weights.is_dir():
        folder = f"local-dir:{weights}"
        return ["--model", folder, "--pretrained", str(weights / _demo_model.WEIGHTS)], f"open_clip:{folder}"
    return ["--model", CONFIG, "--pretrained", str(weights)], f"open_clip:{CONFIG}@{weights}"


def clipbench_cmd(task: str, data: Path, weights: Path, result: Path, args: argparse.Namespace) -> list[str]:
    cmd = [str(CB_PY), str(BENCH / "_clipbench_runner.py"), "--config-dir", str(CONFIG_DIR)]
    cmd += ["--threads", str(args.threads), "--"] if args.threads else ["--"]
    cmd += ["eval", "--dataset", f"wds/{data.name}", "--dataset_root", str(data), *model_args(weights)[0]]
    cmd += ["--task", TASKS[task], "--output", str(result)]
    cmd += ["--batch_size", str(args.batch_size), "--num_workers", str(args.workers), "--no_amp", "--quiet"]
    return cmd + (["--recall_k", "1", "5", "10"] if task == "retrieval" else [])


def clipkit_cmd(task: str, data: Path, weights: Path, out: Path, args: argparse.Namespace) -> list[str]:
    cmd = [str(CK_PY), str(BENCH / "_clipkit_eval_runner.py")]
    cmd += ["eval", task, "--model", model_args(weights)[1], "--dataset", str(data)]
    cmd += ["--alpha", "drop", "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    return cmd + ["--output", str(out)]


def thread_env(threads: int) -> dict[str, str]:
    """The environment of both tools' processes: offline, and with ``threads`` > 0 the OpenMP and
    MKL pools sized to it (torch's intra-op pool is set in the process as well)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def reported_threads(log: Path) -> int:
    """The torch thread count the process printed (``[bench-threads] torch N``), or raise."""
    found = THREADS_LINE.findall(log.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"{log}: the process did not report its torch threads ('[bench-threads] torch N')")
    return int(found[-1])


def timed(cmd: list[str], log: Path, threads: int) -> tuple[float, float, int]:
    """(wall s, CPU s of the process and its children, torch threads it reported); raises with
    the log tail on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, check=False, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=thread_env(threads)
        )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, reported_threads(log)


def compare(cb: dict, ck: dict) -> list[dict]:
    rows = []
    for key, want in cb["metrics"].items():
        got = ck["metrics"].get(key)
        same = got is not None and round(got, 4) == round(want, 4)
        rows.append({"task": cb["task"], "metric": key, "clip_benchmark": want, "clipkit": got, "same": same})
    return rows


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
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
        help="torch threads for both tools (OMP/MKL env and torch.set_num_threads in each process); "
        "0 = each tool's default",
    )
    p.add_argument(
        "--model",
        default="tiny",
        choices=sorted(WALL_TARGETS),
        help="tiny: open_clip clipkit-tiny-ViT, random weights (start-up dominates); demo224: the demo's "
        "EfficientNet-Lite0 + MiniLM at 224 px, exported by clipkit export (the forward pass dominates)",
    )
    p.add_argument(
        "--demo-samples",
        type=int,
        default=3200,
        help="demo224: training samples of the demo recipe at 224 px (0 = untrained heads, seed 0); built once",
    )
    p.add_argument("--out", default=str(_record.RUNS / "eval_parity"), help="data, run folders and logs")
    _record.add_record_flag(p)
    return p


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_round(rep: int, args: argparse.Namespace, out: Path, data: dict, weights: Path, seen: dict) -> None:
    """One interleaved round: every tool runs every task once, as its own process."""
    for tool in TOOLS if rep % 2 == 0 else TOOLS[::-1]:
        for task in TASKS:
            run_dir = out / "runs" / f"{tool}-{task}-{rep}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            if tool == "clip_benchmark":
                cmd = clipbench_cmd(task, data[task], weights, run_dir / "result.json", args)
            else:
                cmd = clipkit_cmd(task, data[task], weights, run_dir, args)
            wall, cpu, threads = timed(cmd, run_dir / "log.txt", args.threads)
            seen["times"].setdefault((tool, task), []).append((wall, cpu))
            seen["threads"].setdefault(tool, set()).add(threads)
            found = sorted(run_dir.rglob("*.json"))
            seen["results"][(tool, task)] = json.loads(found[0].read_text())
            print(
                f"round {rep + 1}/{args.repeats} {tool:14s} {task:9s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  "
                f"torch threads {threads}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = _record.output_dir(args.out)
    load_start = _record.load_average()
    print(f"load average at the start (1, 5, 15 min): {load_start}", flush=True)
    if not CB_PY.exists():
        subprocess.run(["bash", str(BENCH / "setup_clipbench_env.sh")], check=True)
    shutil.rmtree(out / "data", ignore_errors=True)
    data = {"zeroshot": zeroshot_set(out / "data", args.zeroshot_shards)}
    data["retrieval"] = retrieval_set(out / "data", args.retrieval_images)
    if args.model == "tiny":
        weights = weights_file(out)
    else:
        weights = _demo_model.demo_export(out, args.demo_samples, args.threads)
    seen: dict = {"times": {}, "results": {}, "threads": {}}
    for rep in range(args.repeats):
        run_round(rep, args, out, data, weights, seen)
    loads = (load_start, _record.load_average())
    print(f"load average at the end (1, 5, 15 min): {loads[1]}", flush=True)
    targets = _record.Targets()
    report = summarize(args, argv, seen, (data, weights, loads), targets)
    print(report, flush=True)
    _record.save_report("eval_parity", report, args.record)
    return targets.exit_code()


def model_line(args: argparse.Namespace, weights: Path) -> str:
    if args.model == "tiny":
        return f"open_clip `{CONFIG}` (fixed random weights `{weights.name}`, seed 0)"
    how = f"trained {args.demo_samples} samples, seed 0" if args.demo_samples else "untrained heads, seed 0"
    return (
        f"the demo's EfficientNet-Lite0 + MiniLM at {_demo_model.IMAGE_SIZE} px (`train/lit_emoji.yaml`, {how}), "
        f"exported by `clipkit export` to `{weights}`, loaded by both tools as `local-dir:`"
    )


def machine_line(args: argparse.Namespace, seen: dict, weights: Path, loads: tuple[str, str]) -> str:
    used = {tool: ", ".join(map(str, sorted(seen["threads"][tool]))) for tool in TOOLS}
    asked = f"--threads {args.threads} for both" if args.threads else "each tool's default"
    return (
        f"machine: {os.cpu_count()} cpus, load average (1, 5, 15 min) {loads[0]} at the start, {loads[1]} at "
        f"the end; python {platform.python_version()}, CPU only; model {model_line(args, weights)}; "
        f"zero-shot: {args.zeroshot_shards * 1000} Animal-MNIST images, "
        f"10 classes x 8 prompts; retrieval: {args.retrieval_images} emoji images x 2-3 captions; batch "
        f"{args.batch_size}, {args.workers} loader workers; torch threads ({asked}) as each process reported "
        f"them: CLIP_benchmark {used['clip_benchmark']}, clipkit {used['clipkit']}; fp32, alpha dropped "
        f"(CLIP_benchmark's decoding); medians of {args.repeats} interleaved rounds, one process per "
        "(tool, task), times of whole processes.\n"
    )


def time_table(times: dict) -> tuple[list[str], float]:
    """The wall / CPU table of both tasks, and clipkit's wall ratio over both."""
    lines = [
        "| task | CLIP_benchmark wall s | clipkit wall s | ratio wall | CLIP_benchmark CPU s | clipkit CPU s | ratio CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    tot = {tool: [0.0, 0.0] for tool in TOOLS}
    for task in TASKS:
        (cb_w, cb_c), (ck_w, ck_c) = (
            [_median([t[i] for t in times[(tool, task)]]) for i in (0, 1)] for tool in TOOLS
        )
        tot["clip_benchmark"] = [tot["clip_benchmark"][0] + cb_w, tot["clip_benchmark"][1] + cb_c]
        tot["clipkit"] = [tot["clipkit"][0] + ck_w, tot["clipkit"][1] + ck_c]
        lines.append(
            f"| {task} | {cb_w:.1f} | {ck_w:.1f} | {ck_w / cb_w:.2f} | {cb_c:.1f} | {ck_c:.1f} | {ck_c / cb_c:.2f} |"
        )
    (cbw, cbc), (ckw, ckc) = tot["clip_benchmark"], tot["clipkit"]
    lines.append(
        f"| **both** | {cbw:.1f} | {ckw:.1f} | **{ckw / cbw:.2f}** | {cbc:.1f} | {ckc:.1f} | {ckc / cbc:.2f} |"
    )
    return lines, ckw / cbw


def summarize(args, argv: list[str], seen: dict, setting: tuple, targets: _record.Targets) -> str:
    data, weights, loads = setting
    title = f"{datetime.now().isoformat(timespec='seconds')}: clipkit eval vs CLIP_benchmark 1.6.2"
    lines = _record.heading(title, "eval_parity.py", argv)
    lines.append(machine_line(args, seen, weights, loads))
    table, ratio = time_table(seen["times"])
    lines += table
    goal = WALL_TARGETS[args.model]
    lines += ["", "- " + targets.check(f"clipkit wall <= {goal} x CLIP_benchmark's", ratio <= goal,
                                       f"{ratio:.2f}")]  # fmt: skip
    if args.threads:
        used = {tool: sorted(seen["threads"][tool]) for tool in TOOLS}
        same = all(v == [args.threads] for v in used.values())
        lines.append("- " + targets.check(f"both tools ran at {args.threads} torch threads", same, str(used)))
    rows = [
        r
        for task in TASKS
        for r in compare(seen["results"][("clip_benchmark", task)], seen["results"][("clipkit", task)])
    ]
    ok = all(r["same"] for r in rows)
    lines.append(
        "- "
        + targets.check(
            "every metric equal to 4 decimals", ok, f"{sum(r['same'] for r in rows)} of {len(rows)}"
        )
    )
    lines += [
        "",
        "| task | metric | CLIP_benchmark | clipkit | same to 4 decimals |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        got = "missing" if r["clipkit"] is None else f"{r['clipkit']:.6f}"
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['clip_benchmark']:.6f} | {got} | {'yes' if r['same'] else 'NO'} |"
        )
    lines += ["", f"Verdict: {targets.summary()}.", ""]
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
