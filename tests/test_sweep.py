"""``clipkit sweep``: variant expansion, up-front validation, kill and resume, the summary's
statistics against a hand computation, and parallel runs equal to sequential ones.

The runs train the tiny open_clip model of ``training_helpers`` for 12 steps and evaluate it on
a tiny suite built with ``eval_helpers``; each sweep that trains runs as ``clipkit sweep`` in a
child process (so it can be killed), sharing one set of shards, recipe and suite.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from eval_helpers import wds_classification, wds_retrieval
from training_helpers import tiny_tree, write_shards

from clipkit.config import parse_overrides
from clipkit.sweep import Options, SweepError, load_sweep, run_sweep
from clipkit.sweep.report import MARKER, z_score
from clipkit.sweep.spec import format_value, grid_variants, parse_sweep, random_variants

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
# Every optimizer step slowed by 0.25 s, so the test can kill the sweep mid-run: a
# sitecustomize on PYTHONPATH, imported by every interpreter the sweep starts (its forkserver
# included, which forks the runs).
SLOW_STEPS = """
import time
from clipkit.training import loop
step = loop.train_step
def slow(*args, **kw):
    out = step(*args, **kw)
    time.sleep(0.25)
    return out
loop.train_step = slow
"""
SWEEP = """
recipe: recipe.yaml
suite: suite.yaml
seeds: [0, 1]
overrides: [train.threads=1, data.workers=1]   # runs read through a loader worker, as recipes do
variants:
  lr_high: [optim.lr=1.0e-2]
"""


# ----------------------------------------------------------------------------- expansion


def test_grid_is_the_cartesian_product_and_values_read_back() -> None:
    grid = {
        "optim.lr": [1e-3, 1e-5, 0.25],
        "model.text.unlocked_layers": [0, 2],
        "loss.name": ["clip", "siglip"],
    }
    variants = grid_variants(grid)
    expected = list(itertools.product(*grid.values()))
    assert len(variants) == len(expected) == 12
    for variant, point in zip(variants, expected):
        tree = parse_overrides(list(variant.overrides))
        got = (tree["optim"]["lr"], tree["model"]["text"]["unlocked_layers"], tree["loss"]["name"])
        assert got == point  # 1e-5 reads back as a float, not YAML 1.1's string "1e-5"
        assert variant.name == ",".join(variant.overrides)
    assert len({v.name for v in variants}) == 12
    assert format_value(1e-5) == "1.0e-05" and isinstance(parse_overrides(["a=1.0e-05"])["a"], float)


def test_random_search_is_seeded_and_within_bounds() -> None:
    space = {
        "optim.lr": {"loguniform": ["1e-4", 1e-2]},
        "optim.weight_decay": {"uniform": [0.0, 0.2]},
        "model.text.unlocked_layers": {"int": [0, 3]},
        "loss.name": {"choice": ["clip", "siglip", "dcl"]},
    }
    draws = random_variants({"n": 300, "seed": 7, "space": space})
    assert draws == random_variants({"n": 300, "seed": 7, "space": space})
    assert draws != random_variants({"n": 300, "seed": 8, "space": space})
    assert [v.name for v in draws[:2]] == ["random000", "random001"]
    trees = [parse_overrides(list(v.overrides)) for v in draws]
    lr = np.array([t["optim"]["lr"] for t in trees])
    wd = np.array([t["optim"]["weight_decay"] for t in trees])
    layers = [t["model"]["text"]["unlocked_layers"] for t in trees]
    assert lr.min() >= 1e-4 and lr.max() <= 1e-2 and wd.min() >= 0.0 and wd.max() <= 0.2
    assert set(layers) == {0, 1, 2, 3}  # both ends of the inclusive range are drawn
    assert {t["loss"]["name"] for t in trees} == {"clip", "siglip", "dcl"}
    assert 0.35 < np.mean(lr < 1e-3) < 0.65  # log-uniform: half below the geometric mean
    assert np.mean(lr < 5.05e-3) > 0.75  # far from uniform's ~0.5
    with pytest.raises(SweepError, match="did you mean 'loguniform'"):
        random_variants({"n": 2, "space": {"optim.lr": {"logunifrom": [1e-4, 1e-2]}}})


# ----------------------------------------------------------------------------- shared tiny setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with shards, recipe.yaml (12 steps, a checkpoint every 2), suite.yaml, sweep.yaml."""
    root = tmp_path_factory.mktemp("sweep")
    shards = write_shards(root / "shards", n_shards=2, per_shard=24)
    tree = tiny_tree(shards, root, **{"train.samples": 96, "train.checkpoint_every": 2})
    for key in ("output_dir", "run_name"):
        del tree["train"][key]
    (root / "recipe.yaml").write_text(yaml.safe_dump(tree))
    wds_classification(root / "colors")
    wds_retrieval(root / "pairs")
    suite = {
        "name": "tiny",
        "datasets": [
            {"name": "colors", "task": "zeroshot", "path": "colors"},
            {"name": "pairs", "task": "retrieval", "path": "pairs", "recall_k": [1, 5]},
        ],
    }
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    (root / "sweep.yaml").write_text(SWEEP)
    return root


def clipkit_sweep(root: Path, *args: str, slow: bool = False, file: str = "sweep.yaml") -> subprocess.Popen:
    env = dict(ENV)
    if slow:
        (root / "slow").mkdir(exist_ok=True)
        (root / "slow" / "sitecustomize.py").write_text(SLOW_STEPS)
        env["PYTHONPATH"] = f"{root / 'slow'}{os.pathsep}{ROOT}"
    cmd = [sys.executable, "-m", "clipkit.cli.main", "sweep", file, *args]
    return subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def starts(out: Path) -> dict[str, int]:
    """How many times each run was started, from the sweep's event log."""
    lines = (out / "sweep.log").read_text().splitlines()
    found = [m.group(1) for m in (re.search(r" start (\S+) ", line) for line in lines) if m]
    return {k: found.count(k) for k in sorted(set(found))}


def test_typo_in_a_variant_stops_the_sweep_before_any_run(setup: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(SWEEP)
    data["grid"] = {"optim.lr": [1e-3, 3e-4]}
    data["variants"]["typo"] = ["optim.lrr=0.1"]
    sweep = parse_sweep(data, setup / "sweep.yaml", output=str(tmp_path / "out"))
    with pytest.raises(
        SweepError,
        match=r"variant 'typo' \(seed 0\): unknown config key 'optim.lrr'; did you mean 'optim.lr'",
    ):
        run_sweep(sweep, Options())
    assert not (tmp_path / "out").exists()
    data["variants"]["typo"] = ["train.seed=3"]
    with pytest.raises(SweepError, match="'train.seed' is set by the sweep"):
        parse_sweep(data, setup / "sweep.yaml")


@pytest.fixture(scope="module")
def resumed(setup: Path) -> Path:
    """The sweep killed (SIGKILL) while its second run trains, then run again to the end."""
    out = setup / "runs" / "sweeps" / "sweep"
    proc = clipkit_sweep(setup, slow=True)
    second = out / "runs" / "baseline__s1" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(second.glob("step_*.json")):  # a complete checkpoint of the second run
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the second run wrote no checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    time.sleep(0.5)
    runs = out / "runs"
    assert (runs / "baseline__s0" / "sweep_result.json").is_file()
    assert not (runs / "baseline__s1" / "sweep_result.json").exists()
    assert not (runs / "lr_high__s0").exists()
    lines: list[str] = []
    run_sweep(load_sweep(setup / "sweep.yaml", output=str(out)), Options(dry_run=True), log=lines.append)
    lines = "\n".join(lines).splitlines()
    plan = dict(line.split(None, 1) for line in lines[lines.index("runs:") + 1 :])
    assert plan["baseline__s0"] == "done" and plan["lr_high__s1"] == "new"
    assert re.fullmatch(r"resume \d+", plan["baseline__s1"]) and int(plan["baseline__s1"][7:]) >= 2
    proc = clipkit_sweep(setup)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    return out


def test_killed_sweep_resumes_the_interrupted_run_and_skips_finished_ones(resumed: Path) -> None:
    assert starts(resumed) == {"baseline__s0": 1, "baseline__s1": 2, "lr_high__s0": 1, "lr_high__s1": 1}
    results = pd.read_csv(resumed / "results.csv")
    assert list(results["status"]) == ["done"] * 4
    from_step = dict(zip(results["run_id"], results["resumed_from_step"]))
    assert from_step["baseline__s1"] >= 2  # continued from its checkpoint, not from step 0
    assert all(math.isnan(from_step[r]) for r in ("baseline__s0", "lr_high__s0", "lr_high__s1"))
    # checkpoints: final (the default) keeps only the last one, step 12, of each run
    for run_id in from_step:
        kept = sorted(p.name for p in (resumed / "runs" / run_id / "checkpoints").glob("step_*.pt"))
        assert kept == ["step_00000012.pt"]
    parquet = pd.read_parquet(resumed / "results.parquet")
    assert list(parquet.columns) == list(results.columns)
    pd.testing.assert_series_equal(parquet["colors/acc1"], results["colors/acc1"], check_exact=True)
    assert (resumed / "summary.png").stat().st_size > 0


def _cells(md: str) -> dict[str, list[str]]:
    """Rows of the summary table: variant -> [seeds, metric cells ...]."""
    table = md.split("| variant | seeds |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    return {r[0]: r[1:] for r in rows}


def test_summary_mean_std_and_z_equal_a_hand_computation(resumed: Path) -> None:
    results = pd.read_csv(resumed / "results.csv")
    md = (resumed / "summary.md").read_text()
    assert md.startswith(MARKER)
    header = md.split("| variant | seeds |", 1)[1].split("\n", 1)[0]
    metrics = [c.strip() for c in header.strip().strip("|").split("|")]
    assert metrics == ["colors/acc1", "pairs/image_retrieval_recall@5", "wall_s"]
    cells = _cells(md)
    summary = pd.read_csv(resumed / "summary.csv")
    base = {m: list(results.loc[results["variant"] == "baseline", m]) for m in metrics}
    for variant in ("baseline", "lr_high"):
        assert cells[variant][0] == "2"
        for metric, text in zip(metrics, cells[variant][1:]):
            xs = list(results.loc[results["variant"] == variant, metric])
            mean, std = statistics.fmean(xs), statistics.stdev(xs)
            digits = 1 if metric == "wall_s" else 4
            assert text.startswith(f"{mean:.{digits}f} ± {std:.{digits}f}"), (variant, metric, text)
            row = summary[(summary["variant"] == variant) & (summary["metric"] == metric)].iloc[0]
            assert row["mean"] == pytest.approx(mean, rel=1e-12) and row["std"] == pytest.approx(
                std, rel=1e-12
            )
            if variant == "baseline":
                assert "z" not in text
                continue
            b = base[metric]
            se = math.sqrt(statistics.variance(xs) / len(xs) + statistics.variance(b) / len(b))
            z = (
                (mean - statistics.fmean(b)) / se
                if se
                else (0.0 if mean == statistics.fmean(b) else math.inf)
            )
            shown = "n/a" if math.isnan(z) else ("+inf" if z == math.inf else f"{z:+.2f}")
            assert text.endswith(f"(z {shown})"), (metric, text, z)
            assert row["z"] == pytest.approx(z, rel=1e-9)


def test_z_with_one_seed_or_no_noise() -> None:
    assert math.isnan(z_score([0.5], [0.1, 0.2]))  # one seed: no estimate of its noise
    assert z_score([0.3, 0.3], [0.3, 0.3]) == 0.0
    assert z_score([0.4, 0.4], [0.3, 0.3]) == math.inf
    assert z_score([1.0, 3.0], [0.0, 0.0]) == pytest.approx(2.0 / math.sqrt(2.0 / 2))


def test_hand_written_markdown_is_never_overwritten(resumed: Path, setup: Path) -> None:
    notes = setup / "analysis.md"
    notes.write_text("# my analysis\n")
    sweep = load_sweep(setup / "sweep.yaml", output=str(resumed))
    with pytest.raises(SweepError, match="not written by clipkit sweep"):
        run_sweep(sweep, Options(run=False, summary_out=notes))
    assert notes.read_text() == "# my analysis\n"
    generated = setup / "benchmarks" / "recipes.md"
    run_sweep(sweep, Options(run=False, summary_out=generated))  # a new file, then its own rewrite
    run_sweep(sweep, Options(run=False, summary_out=generated))
    assert _cells(generated.read_text()) == _cells((resumed / "summary.md").read_text())
    # the plot lies beside the summary, linked by name, and is the sweep's own
    assert "](recipes.png)" in generated.read_text()
    assert (setup / "benchmarks" / "recipes.png").read_bytes() == (resumed / "summary.png").read_bytes()


def test_the_summary_plot_never_replaces_a_file_of_another(resumed: Path, setup: Path) -> None:
    sweep = load_sweep(setup / "sweep.yaml", output=str(resumed))
    (setup / "figures").mkdir()
    foreign = setup / "figures" / "results.png"
    foreign.write_bytes(b"a figure of someone else's")
    with pytest.raises(SweepError, match=r"results\.png exists and belongs to no summary"):
        run_sweep(sweep, Options(run=False, summary_out=setup / "figures" / "results.md"))
    assert foreign.read_bytes() == b"a figure of someone else's"
    assert not (setup / "figures" / "results.md").exists()
    with pytest.raises(SweepError, match="name a .md file"):
        run_sweep(sweep, Options(run=False, summary_out=setup / "figures" / "plot.png"))


def test_a_second_sweep_in_the_same_folder_writes_reports_of_its_own(resumed: Path, setup: Path) -> None:
    """Two sweep files sharing one output folder (to share baseline runs): the first to report
    keeps the plain names, the other's reports carry its name; neither overwrites the other."""
    before = {n: (resumed / n).read_bytes() for n in ("results.csv", "summary.md", "summary.csv")}
    assert (resumed / ".sweep_reports").read_text() == "sweep\n"
    (setup / "seed0_only.yaml").write_text(SWEEP.replace("seeds: [0, 1]", "seeds: [0]"))
    lines: list[str] = []
    sweep = load_sweep(setup / "seed0_only.yaml", output=str(resumed))
    assert run_sweep(sweep, Options(run=False), log=lines.append) == 0
    assert {n: (resumed / n).read_bytes() for n in before} == before
    own = pd.read_csv(resumed / "seed0_only.results.csv")
    assert list(own["run_id"]) == ["baseline__s0", "lr_high__s0"]
    assert list(own["status"]) == ["done", "done"]
    shared = pd.read_csv(resumed / "results.csv").set_index("run_id")
    metrics = [c for c in own.columns if "/" in c]
    pd.testing.assert_frame_equal(own.set_index("run_id")[metrics], shared.loc[own["run_id"], metrics])
    md = (resumed / "seed0_only.summary.md").read_text()
    assert md.startswith(MARKER) and "](seed0_only.summary.png)" in md
    assert (resumed / "seed0_only.summary.png").stat().st_size > 0
    assert (resumed / "seed0_only.results.parquet").is_file() and (
        resumed / "seed0_only.summary.csv"
    ).is_file()
    assert (
        lines[-1]
        == f"results: {resumed / 'seed0_only.results.csv'}; summary: {resumed / 'seed0_only.summary.md'}"
    )
    # the folder's own sweep still reports under the plain names
    run_sweep(load_sweep(setup / "sweep.yaml", output=str(resumed)), Options(run=False), log=lines.append)
    assert lines[-1] == f"results: {resumed / 'results.csv'}; summary: {resumed / 'summary.md'}"
    assert _cells((resumed / "summary.md").read_text()) == _cells(before["summary.md"].decode())


def test_parallel_runs_equal_sequential_ones(resumed: Path, setup: Path) -> None:
    """Seed 0 of both variants, two at once, against the same runs of the sequential sweep."""
    (setup / "seed0.yaml").write_text(SWEEP.replace("seeds: [0, 1]", "seeds: [0]"))
    proc = clipkit_sweep(
        setup, "--parallel", "2", "--threads", "1", "--output", "parallel", file="seed0.yaml"
    )
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    seq = pd.read_csv(resumed / "results.csv").set_index("run_id").loc[["baseline__s0", "lr_high__s0"]]
    par = pd.read_csv(setup / "parallel" / "results.csv").set_index("run_id")
    metrics = [c for c in seq.columns if "/" in c]
    assert len(metrics) >= 6 and list(par.index) == list(seq.index)
    pd.testing.assert_frame_equal(par[metrics], seq[metrics], check_exact=True)
    events = (setup / "parallel" / "sweep.log").read_text().splitlines()
    assert [e.split()[2] for e in events[:2]] == ["start", "start"]  # both runs at once
