"""The clipkit side of benchmarks/train_throughput.py: ``clipkit train`` with overrides that
match the OpenCLIP run of the same setup, and its per-step ``metrics.csv`` read back.
"""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
from pathlib import Path

from _throughput_common import (
    LIT_RECIPE,
    MAIN_ENV,
    ROOT,
    Result,
    Setup,
    load_average,
    rel,
    run_logged,
    shard_spec,
)
from _throughput_setups import clear_feature_cache


def yaml_float(x: float) -> str:
    """A float that YAML (1.1, PyYAML) reads back as a float: ``1e-06`` would be a string."""
    text = repr(float(x))
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exp = text.split("e")
        text = f"{mantissa}.0e{exp}"
    return text


def open_clip_embed_dim(name: str) -> int:
    """The embedding width of an open_clip model config (built-in or clipkit's tiny ones)."""
    from clipkit.models.towers_openclip import resolve_config

    return int(resolve_config(name)[1]["embed_dim"])


def clipkit_overrides(st: Setup, run_dir: Path, run_name: str) -> list[str]:
    """Dotted overrides that make a clipkit run match the OpenCLIP run of the same setup."""
    hp = st.hp
    ov = [
        f"data.train={shard_spec(st.shards)}",
        "data.val=",
        f"data.batch_size={st.batch_size}",
        f"data.workers={st.workers}",
        "data.threads_per_worker=1",
        f"train.samples={st.samples}",
        f"train.seed={hp.seed}",
        f"train.precision={hp.precision}",
        f"train.output_dir={run_dir}",
        f"train.run_name={run_name}",
        "train.log_every=1",  # OpenCLIP logs every step too (--log-every-n-steps 1)
        "train.checkpoint_every=0",  # final checkpoint only, like --save-frequency 0
        f"optim.lr={yaml_float(hp.lr)}",
        f"optim.weight_decay={yaml_float(hp.weight_decay)}",
        f"optim.beta1={yaml_float(hp.beta1)}",
        f"optim.beta2={yaml_float(hp.beta2)}",
        f"optim.eps={yaml_float(hp.eps)}",
        f"optim.warmup_steps={hp.warmup_steps}",
        "optim.min_lr_ratio=0.0",  # OpenCLIP's cosine decays to 0
        f"optim.grad_clip={yaml_float(hp.grad_clip)}",
        "optim.accum_steps=1",
    ]
    if st.name == "small":
        # Both towers from one open_clip config (clipkit builds the model once and splits it);
        # open_clip towers project already, so no extra projection heads.
        ov += [
            f"model.vision.name=open_clip:{st.open_clip_model}",
            f"model.text.name=open_clip:{st.open_clip_model}",
            "model.vision.weights=",
            "model.text.weights=",
            "model.vision.locked=false",
            "model.text.locked=false",
            f"model.vision.image_size={st.small_image_size}",
            f"model.text.context_length={st.small_context_length}",
            f"model.embed_dim={open_clip_embed_dim(st.open_clip_model)}",  # projection=none keeps it
            "model.vision.augment=true",  # open_clip_train always trains with its train transform
            "model.projection=none",
            "loss.name=clip",
        ]
    return ov + list(st.clipkit_overrides)


def clipkit_recipe(st: Setup) -> str:
    if st.clipkit_recipe:
        return st.clipkit_recipe
    if st.name == "lit":
        return str(LIT_RECIPE.relative_to(ROOT))
    # The small setup is all overrides on top of clipkit's defaults (an empty recipe).
    recipe = ROOT / ".cache" / "bench_empty_recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text("{}\n")
    return str(recipe)


def run_clipkit(st: Setup, out_root: Path, skip_steps: int) -> Result:
    """Train the same setup with clipkit: ``.venv/bin/clipkit train <recipe> key=value ...``.

    Reads per-step loss, samples seen and samples/s from ``<run dir>/metrics.csv``
    (clipkit/training/loop.py logs every step with train.log_every=1).
    """
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out_root / "clipkit"
    name = f"{st.name}-{stamp}"
    clipkit_bin = MAIN_ENV / "bin" / "clipkit"
    recipe = clipkit_recipe(st)
    cmd = [rel(clipkit_bin), "train", rel(recipe), *clipkit_overrides(st, run_dir, name)]
    res = Result(st.name, "clipkit", command=shlex.join(cmd))
    missing = [
        str(p)
        for p in (clipkit_bin, ROOT / "clipkit" / "training" / "loop.py", ROOT / recipe)
        if not Path(p).exists()
    ]
    if missing:
        res.note = f"not run: missing {', '.join(missing)}"
        print(f"[bench] {st.name}/clipkit: skipped -- {res.note}", flush=True)
        return res
    run_dir.mkdir(parents=True, exist_ok=True)
    if not st.warm_cache:
        clear_feature_cache(st.shards)  # cold start: cache building is part of the measured run
    log_path = run_dir / f"{name}.log"
    print(
        f"[bench] {st.name}/clipkit (load avg {load_average()}): {res.command}\n[bench]   log: {log_path}",
        flush=True,
    )
    rc, wall, cpu = run_logged(cmd, log_path, st.threads)
    res.log, res.cpu_s, res.load = str(log_path), cpu, load_average()
    if rc != 0:
        res.note = f"exit {rc}; see {log_path}"
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        return res
    res.wall_s = wall
    res.samples, res.steady_sps, res.final_loss, res.curve = read_clipkit_metrics(run_dir / name, skip_steps)
    return res


def read_clipkit_metrics(run_dir: Path, skip_steps: int) -> tuple[int, float, float, list]:
    """(samples, steady samples/s, mean loss of the last 20 steps, [(samples seen, loss)])."""
    import csv

    path = run_dir / "metrics.csv"
    if not path.exists():
        return 0, float("nan"), float("nan"), []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    curve, times, prev = [], [], 0
    for row in rows:
        seen = int(float(row["samples_seen"]))
        curve.append((seen, float(row["loss"])))
        sps = float(row.get("samples_per_s") or "nan")
        if sps > 0:
            times.append((seen - prev, (seen - prev) / sps))
        prev = seen
    timed = times[skip_steps:]
    steady = sum(n for n, _ in timed) / sum(t for _, t in timed) if timed else float("nan")
    tail = [loss for _, loss in curve[-20:]]
    final = sum(tail) / len(tail) if tail else float("nan")
    return (curve[-1][0] if curve else 0), steady, final, curve
