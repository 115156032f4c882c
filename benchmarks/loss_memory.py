"""Peak memory and time of one loss forward + backward at large batch: clipkit's tiled CLIP /
SigLIP losses (``clip_tiled``, ``siglip_tiled``) against open_clip's ``ClipLoss`` / ``SigLipLoss``.

    .venv/bin/python benchmarks/loss_memory.py                      # B = 4096 .. 262144, D = 512
    .venv/bin/python benchmarks/loss_memory.py --sizes 4096 16384   # a quick look
    .venv/bin/python benchmarks/loss_memory.py --record             # + a section in RESULTS.md

Targets (issue #7): <= 1 GB above bare torch at B = 65,536; <= 1.2x open_clip's wall time at
B = 16,384. Exit status 1 when one is missed. The report goes to stdout and
runs/bench/loss_memory/, and to RESULTS.md only with ``--record``.

Method. Every (implementation, B) runs in a fresh child process (one at a time) that imports
torch and the loss, allocates the inputs (two (B, D) float32 L2-normalised leaves that require
grad, ``logit_scale`` 10, ``logit_bias`` -10), runs forward + backward ``--iters`` times and
reports its peak resident set size (``ru_maxrss``) and the best iteration's wall and CPU time.
"above bare" subtracts the peak RSS of a child that only imports torch; "above inputs"
subtracts the child's own RSS after allocating the inputs (what the loss itself costs,
gradients of the inputs included).

What is not run:

- open_clip where its predicted peak exceeds ``--dense-limit-gb`` or half of the memory
  available: its peak above bare is fitted as ``a B^2 + b B`` through the two largest sizes
  it ran at, and the extrapolation is reported (65,536 would need ~70 GB, 262,144 ~1 TB).
- clipkit above ``--max-real`` (default 65,536): 262,144 costs ~1.5 CPU-hours per loss here
  (4,096 blocks of 4096 x 4096 x 512 matmuls, 4 per block). Its peak is *simulated*: the same
  code runs on torch's ``meta`` device (shapes, no data) under a dispatch mode that adds up the
  bytes of every live tensor storage; the simulation also runs at every size that runs for
  real, so the table shows how well it matches the measured peaks. Its time is extrapolated
  from the largest real run as ``t * (B / B_real)^2``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _record

MB = 2**20
IMPLS = {
    "clipkit clip_tiled": ("clipkit", "clip_tiled"),
    "clipkit siglip_tiled": ("clipkit", "siglip_tiled"),
    "open_clip ClipLoss": ("open_clip", "clip"),
    "open_clip SigLipLoss": ("open_clip", "siglip"),
}


# ----------------------------------------------------------------------------- child side


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _open_clip_loss_module():
    # open_clip/loss.py imports only torch: load that file alone, not the whole package.
    import importlib.util

    folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_open_clip_loss", Path(folder) / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(impl: str, b: int, d: int, iters: int, meta: bool) -> dict:
    import torch

    tool, name = IMPLS[impl]
    if tool == "clipkit":
        from clipkit.losses import LOSSES

        loss_fn = LOSSES.build(name)

        def run(x, y, s, bias):
            return loss_fn({"image_emb": x, "text_emb": y, "logit_scale": s, "logit_bias": bias})["loss"]
    else:
        oc = _open_clip_loss_module()
        loss_fn = oc.ClipLoss() if name == "clip" else oc.SigLipLoss()

        def run(x, y, s, bias):
            return loss_fn(x, y, s, bias if name == "siglip" else None)

    rss_import = _rss_mb()
    from clipkit.training.memory import LiveBytes

    tracker = LiveBytes() if meta else None
    if tracker is not None:
        tracker.__enter__()
    device = "meta" if meta else "cpu"
    g = torch.Generator().manual_seed(0)

    def unit_rows() -> torch.Tensor:  # normalised in place: no transient (B, D) copy in the RSS
        t = torch.randn(b, d, generator=g)
        return t.div_(t.norm(dim=-1, keepdim=True)).to(device).requires_grad_()

    x, y = unit_rows(), unit_rows()
    s = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    inputs_bytes = tracker.live if tracker is not None else 4 * 2 * b * d
    rss_inputs = _rss_mb()
    walls, cpus = [], []
    for _ in range(iters):
        x.grad = y.grad = s.grad = bias.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        run(x, y, s, bias).backward()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    result = {"impl": impl, "batch": b, "dim": d, "meta": meta}
    if tracker is not None:
        tracker.__exit__(None, None, None)
        result.update(sim_peak_mb=tracker.peak / MB, sim_inputs_mb=inputs_bytes / MB)
    else:
        result.update(
            rss_import_mb=rss_import,
            rss_inputs_mb=rss_inputs,
            peak_mb=_rss_mb(),
            wall_s=min(walls),
            cpu_s=min(cpus),
            load=os.getloadavg()[0],
        )
    return result


def bare() -> dict:
    import torch  # noqa: F401

    return {"impl": "bare", "peak_mb": _rss_mb()}


# ----------------------------------------------------------------------------- parent side


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return math.inf


def spawn(args: list[str], threads: int, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", *args, "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dense_fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(a, b) of peak_above_bare = a B^2 + b B through the two largest measured sizes."""
    if len(points) < 2:
        return None
    (b1, m1), (b2, m2) = sorted(points)[-2:]
    a = (m2 / b2 - m1 / b1) / (b2 - b1)
    return a, m1 / b1 - a * b1


def plan(opts: argparse.Namespace, impl: str, b: int, base: float, dense_points: dict) -> dict:
    """The row of (impl, B) before it runs: simulated peak (clipkit), prediction, run or not."""
    row: dict = {"impl": impl, "batch": b}
    if IMPLS[impl][0] == "clipkit":
        sim = spawn([impl, str(b), "--dim", str(opts.dim), "--meta"], 1, 3600)
        row["sim_above_inputs_mb"] = sim["sim_peak_mb"] - sim["sim_inputs_mb"]
        run_real, predicted = b <= opts.max_real, base + sim["sim_peak_mb"] * 1.3
    else:
        fit = dense_fit(dense_points.get(impl, []))
        guess = 6 * 4 * b * b / MB  # ~6 (B, B) float32 buffers before any fit exists
        predicted = base + (fit[0] * b * b + fit[1] * b if fit else guess)
        run_real = predicted <= opts.dense_limit_gb * 1024
        row["predicted_mb"] = predicted - base
        if not run_real:
            row["note"] = f"not run: predicted {predicted / 1024:.1f} GB > --dense-limit-gb"
    if run_real and predicted > mem_available_mb() / 2:
        run_real = False
        row["note"] = f"not run: needs ~{predicted / 1024:.1f} GB, {mem_available_mb() / 1024:.1f} available"
    row["run"] = run_real
    return row


def measure(opts: argparse.Namespace) -> tuple[float, list[dict]]:
    """Every (impl, B) once; at ``--time-sizes`` ``--rounds`` times, impls interleaved (the
    machine's load drifts: the paired runs of one round saw about the same load)."""
    base = spawn(["bare"], opts.threads, 600)["peak_mb"]
    print(f"bare torch: {base:.0f} MB peak RSS", flush=True)
    rows: list[dict] = []
    dense_points: dict[str, list[tuple[int, float]]] = {}
    for b in opts.sizes:
        todo = [plan(opts, impl, b, base, dense_points) for impl in opts.impls]
        timed = b in opts.time_sizes
        for r in range(opts.rounds if timed else 1):
            for row in todo if r % 2 == 0 else todo[::-1]:
                if not row["run"]:
                    continue
                iters = opts.iters if timed else 1
                args = [row["impl"], str(b), "--dim", str(opts.dim), "--iters", str(iters)]
                res = spawn(args, opts.threads, 7200)
                print(json.dumps(res), flush=True)
                row.setdefault("walls", []).append(res["wall_s"])
                row.setdefault("cpus", []).append(res["cpu_s"])
                row.setdefault("loads", []).append(res["load"])
                if "peak_mb" not in row:
                    row.update(res)
                    row["above_bare_mb"] = res["peak_mb"] - base
                    row["above_inputs_mb"] = res["peak_mb"] - res["rss_inputs_mb"]
        for row in todo:
            if row["run"]:
                row.update(wall_s=min(row["walls"]), cpu_s=min(row["cpus"]), load=min(row["loads"]))
                if IMPLS[row["impl"]][0] == "open_clip":
                    dense_points.setdefault(row["impl"], []).append((b, row["above_bare_mb"]))
        rows += todo
    extrapolate(rows, base, opts.dim)
    return base, rows


def extrapolate(rows: list[dict], base: float, dim: int) -> None:
    """clipkit rows that did not run: time = largest real run's * (B / B_real)^2; peak above
    bare = that run's import overhead + the inputs + the simulated peak above the inputs."""
    for impl in {r["impl"] for r in rows}:
        real = [r for r in rows if r["impl"] == impl and "wall_s" in r]
        if not real:
            continue
        ref = max(real, key=lambda r: r["batch"])
        imports = ref["rss_import_mb"] - base
        for r in rows:
            if r["impl"] == impl and "wall_s" not in r and "sim_above_inputs_mb" in r:
                f = (r["batch"] / ref["batch"]) ** 2
                r["est_cpu_s"], r["est_wall_s"] = ref["cpu_s"] * f, ref["wall_s"] * f
                r["est_above_bare_mb"] = imports + 2 * 4 * r["batch"] * dim / MB + r["sim_above_inputs_mb"]


def fmt_gb(mb: float | None, prefix: str = "") -> str:
    return "" if mb is None else f"{prefix}{mb / 1024:.2f}"


def table(base: float, rows: list[dict]) -> str:
    lines = [
        (
            f"bare `import torch` peak RSS: {base / 1024:.2f} GB. GB = 2^30 bytes. `~` = simulated "
            "(clipkit) or extrapolated (open_clip), not run."
        ),
        "",
        (
            "| loss | B | peak RSS | above bare | above inputs | simulated above inputs "
            "| wall s | CPU s | load avg / note |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "peak_mb" in r:
            peak, bare_, inp = fmt_gb(r["peak_mb"]), fmt_gb(r["above_bare_mb"]), fmt_gb(r["above_inputs_mb"])
            wall, cpu, load = f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['load']:.1f}"
        else:
            above = r.get("predicted_mb", r.get("est_above_bare_mb"))
            inp = fmt_gb(r.get("sim_above_inputs_mb"), "~")
            peak, bare_ = fmt_gb(None if above is None else above + base, "~"), fmt_gb(above, "~")
            wall = f"~{r['est_wall_s']:.0f}" if "est_wall_s" in r else ""
            cpu = f"~{r['est_cpu_s']:.0f}" if "est_cpu_s" in r else ""
            load = r.get("note", "")
        sim = fmt_gb(r.get("sim_above_inputs_mb"))
        lines.append(
            f"| {r['impl']} | {r['batch']:,} | {peak} | {bare_} | {inp} | {sim} | {wall} | {cpu} | {load} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict], b: int) -> list[str]:
    """clipkit / open_clip time at B: best against best, and the median of the paired rounds."""
    out = []
    pairs = (("clipkit clip_tiled", "open_clip ClipLoss"), ("clipkit siglip_tiled", "open_clip SigLipLoss"))
    for ours, theirs in pairs:
        a = next((r for r in rows if r["impl"] == ours and r["batch"] == b and "walls" in r), None)
        c = next((r for r in rows if r["impl"] == theirs and r["batch"] == b and "walls" in r), None)
        if not (a and c):
            continue
        paired = sorted(x / y for x, y in zip(a["walls"], c["walls"]))
        walls = lambda r: ", ".join(f"{w:.1f}" for w in r["walls"])
        out.append(
            f"- B = {b:,}: {ours} / {theirs}: wall {a['wall_s'] / c['wall_s']:.2f}x best vs best, "
            f"{paired[len(paired) // 2]:.2f}x median of {len(paired)} paired rounds; "
            f"CPU {a['cpu_s'] / c['cpu_s']:.2f}x (walls s: {walls(a)} vs {walls(c)})"
        )
    return out


def targets(rows: list[dict], verdicts: _record.Targets) -> list[str]:
    """Issue #7's bar: <= 1 GB above bare torch at 65,536; <= 1.2x open_clip's wall at 16,384."""
    out = []
    for impl in ("clipkit clip_tiled", "clipkit siglip_tiled"):
        r = next((r for r in rows if r["impl"] == impl and r["batch"] == 65536), None)
        above = None if r is None else r.get("above_bare_mb", r.get("est_above_bare_mb"))
        if above is not None:
            how = "measured" if "above_bare_mb" in r else "simulated"
            what = f"<= 1 GB above bare torch at B = 65,536: {impl}"
            out.append("- " + verdicts.check(what, above <= 1024, f"{above / 1024:.2f} GB, {how}"))
    for line in ratios(rows, 16384):
        ratio = float(line.split("wall ")[1].split("x")[0])
        out.append(
            "- " + verdicts.check("<= 1.2x open_clip's wall time at B = 16,384", ratio <= 1.2, line[2:])
        )
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS), metavar="IMPL")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-sizes", type=int, nargs="*", default=[16384], help="B timed over --rounds")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs per impl at --time-sizes")
    p.add_argument("--iters", type=int, default=2, help="forward+backward per timed child; best kept")
    p.add_argument("--max-real", type=int, default=65536, help="largest B clipkit runs for real")
    p.add_argument(
        "--dense-limit-gb", type=float, default=8.0, help="largest predicted open_clip peak to run"
    )
    _record.add_record_flag(p)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--meta", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_args(argv)
    if opts.child:
        import torch

        torch.set_num_threads(opts.threads)
        res = (
            bare()
            if opts.child[0] == "bare"
            else child(opts.child[0], int(opts.child[1]), opts.dim, opts.iters, opts.meta)
        )
        print(json.dumps(res))
        return 0
    load_start = _record.load_average()
    print(f"load average at the start (1, 5, 15 min): {load_start}", flush=True)
    base, rows = measure(opts)
    report = table(base, rows)
    lines = [report, ""]
    for b in opts.sizes:
        lines += ratios(rows, b)
    verdicts = _record.Targets()
    lines += ["", *targets(rows, verdicts), "", f"Verdict: {verdicts.summary()}."]
    text = "\n".join(lines)
    print(text)
    load_end = _record.load_average()
    print(f"load average at the end (1, 5, 15 min): {load_end}", flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    section = _record.heading_text(
        f"Loss memory: tiled clipkit losses vs open_clip ({stamp})", "loss_memory.py", argv
    ) + (
        f"D = {opts.dim}, float32, forward + "
        f"backward, {opts.threads} threads, CPU, load average (1, 5, 15 min) {load_start} at the start, "
        f"{load_end} at the end; timed sizes: best of {opts.iters} iterations per run, {opts.rounds} "
        f"interleaved runs.\n\n{text}\n"
    )
    _record.save_report("loss_memory", section, opts.record)
    return verdicts.exit_code()


if __name__ == "__main__":
    sys.exit(main())
