"""The demo end to end, and a killed + resumed demo training (slow: minutes; run by ``make bench``).

.venv/bin/pytest -q -m slow tests/test_demo_slow.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipkit.training import checkpoint as ckpt

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "train" / "lit_emoji.yaml"


def clipkit(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "clipkit.cli.main", *args], cwd=REPO, env=env, **kw)


def sidecar(path: Path) -> dict:
    return json.loads(ckpt.sidecar_path(path).read_text())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_data")


def test_demo_trains_a_model_that_beats_the_untrained_one(data_root, tmp_path):
    proc = clipkit("demo", "--data", str(data_root), f"train.output_dir={tmp_path}", "train.run_name=demo")
    assert proc.wait(timeout=1800) == 0
    run = tmp_path / "demo"
    results = {}
    for state in ("before", "after"):
        for task in ("zeroshot", "retrieval"):
            doc = json.loads((run / f"eval_{state}_{task}.json").read_text())
            assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(doc)
            results[state, task] = doc["metrics"]
    before, after = results["before", "zeroshot"], results["after", "zeroshot"]
    # 10 balanced classes: chance is 0.10; the trained projections must clearly beat it and the untrained.
    assert after["acc1"] >= 0.15 and after["acc1"] >= before["acc1"] + 0.05
    rb, ra = results["before", "retrieval"], results["after", "retrieval"]
    assert ra["image_retrieval_recall@5"] >= rb["image_retrieval_recall@5"] + 0.3
    assert ra["text_retrieval_recall@5"] >= rb["text_retrieval_recall@5"] + 0.3
    assert sidecar(ckpt.latest(run))["samples_seen"] == 20_000


def test_killed_demo_training_resumes_to_the_same_end(data_root, tmp_path):
    """SIGKILL the demo recipe after its first checkpoint, resume with train.resume=latest."""
    if not (data_root / "emoji" / "train").is_dir():  # built by the demo test; build it if run alone
        from data_tools import build_emoji

        build_emoji.build(data_root / "emoji")
    common = [
        str(RECIPE),
        f"data.train={data_root / 'emoji' / 'train'}",
        f"data.val={data_root / 'emoji' / 'val'}",
        f"train.output_dir={tmp_path}",
        "train.run_name=killed",
    ]
    proc = clipkit("train", *common, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "killed"
    deadline = time.time() + 1200
    while not (run.is_dir() and list(ckpt.checkpoint_dir(run).glob("*.json"))):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 20 min"
        time.sleep(0.2)
    time.sleep(3)  # kill between checkpoints, mid-way through later steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = sidecar(ckpt.latest(run))["step"]
    assert 0 < killed_at < 313
    assert clipkit("train", *common, "train.resume=latest").wait(timeout=1800) == 0
    end = sidecar(ckpt.latest(run))
    assert (end["step"], end["samples_seen"]) == (313, 20_000)
