"""Experiment trackers (clipkit.training.trackers), offline: a tiny run logs to W&B (offline) and
MLflow (file store); what they hold is read back with their own formats (W&B's protobuf records in
the .wandb file, MLflow's client on the store) and compared with metrics.csv and config.yaml."""

from __future__ import annotations

import csv
import json
import math
import socket
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from training_helpers import tiny_tree, write_shards

from clipkit.config import Config, ConfigError, TrainConfig, from_dict, to_dict
from clipkit.errors import ClipkitError
from clipkit.training import loop
from clipkit.training.trackers import MlflowTracker, check_trackers, start_trackers, tracker_names

# 3 shards x 16 samples, batch 8: 100 samples = 13 steps; a metrics row every 2 steps and at 13.
SAMPLES, STEPS = 100, 13
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=3, per_shard=16)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Both packages' global folders in tmp; any host name lookup in this process fails the test."""
    home = tmp_path / "tracker-home"
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # A store the trackers must NOT use: runs go to <run>/mlruns.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (home / "elsewhere").as_uri())
    # The trackers set these themselves (setdefault); monkeypatch puts the environment back after.
    for var in ("WANDB_ERROR_REPORTING", "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    lookups: list[str] = []
    real = socket.getaddrinfo

    def no_network(host: Any, *args: Any, **kw: Any) -> Any:
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            lookups.append(str(host))
            raise OSError(f"test: no network ({host})")
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    yield
    assert lookups == [], f"a tracker tried to reach {lookups}"
    assert not (home / "elsewhere").exists()


def config(shards: str, out: Path, **overrides: Any) -> Config:
    tree = tiny_tree(shards, out, **{"train.samples": SAMPLES, "train.log_every": 2, **overrides})
    return from_dict(Config, tree)


# ---------------------------------------------------------------------------- the oracle: metrics.csv


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def numeric_by_step(rows: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    """The numeric cells of metrics.csv rows, merged per step (what a tracker is sent)."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        cells = out.setdefault(int(row["step"]), {})
        for key, text in row.items():
            if key == "step" or text in (None, ""):
                continue
            try:
                cells[key] = float(text)
            except ValueError:  # text columns ("skipped": "decode_error=2") are not sent
                continue
    return out


def assert_same(logged: dict[int, dict[str, float]], expected: dict[int, dict[str, float]]) -> None:
    assert sorted(logged) == sorted(expected)
    for step, values in expected.items():
        got = logged[step]
        assert sorted(got) == sorted(values), f"step {step}"
        for key, value in values.items():
            assert float(got[key]) == value or (math.isnan(value) and math.isnan(got[key])), (step, key)


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = str(value)
    return out


# ---------------------------------------------------------------------------- W&B's offline file


def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte ':W&B' header, then 32 KiB
    blocks of chunks: crc32 of type+data (4 bytes), length (2), type (1: full, 2: first, 3: middle,
    4: last), data), each record one ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the block's zero-filled tail
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad checksum at byte {pos}"
        pos, pending = pos + 7 + length, pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_segments(run_dir: Path) -> list[dict[str, Any]]:
    """Each offline W&B run under <run>/wandb (one per training segment), oldest first."""
    import wandb

    wandb.teardown()  # run.finish() returns before W&B's service has written the whole file
    segments = []
    for file in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        seg: dict[str, Any] = {"config": {}, "history": {}, "summary": {}, "exit_code": None}
        for rec in wandb_records(file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                seg["id"], seg["start"] = rec.run.run_id, rec.run.start_time.ToNanoseconds()
                seg["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "history":
                items = {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                row = seg["history"].setdefault(rec.history.step.num, {})
                row.update({k: v for k, v in items.items() if not k.startswith("_")})
            elif kind == "summary":
                for u in rec.summary.update:
                    seg["summary"][".".join(u.nested_key) or u.key] = json.loads(u.value_json)
            elif kind == "exit":
                seg["exit_code"] = rec.exit.exit_code
        seg["config"].pop("_wandb", None)
        segments.append(seg)
    return sorted(segments, key=lambda s: s["start"])


# ---------------------------------------------------------------------------- MLflow's store


def mlflow_client(run_dir: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())


def mlflow_history(client: Any, run_id: str) -> dict[int, dict[str, float]]:
    """Every metric's full history, per step; a step logged twice for a key fails."""
    out: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith("summary/"):
            continue
        for m in client.get_metric_history(run_id, key):
            assert key not in out.get(m.step, {}), f"{key} logged twice at step {m.step}"
            out.setdefault(m.step, {})[key] = m.value
    return out


# ---------------------------------------------------------------------------- the tests


def crash_at(monkeypatch: Any, step: int) -> None:
    """train_step raises on its ``step``-th call, as a run that dies mid-way (after a checkpoint)."""
    real, calls = loop.train_step, []

    def dying(*args: Any, **kw: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == step:
            raise RuntimeError("test: the machine died")
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_step", dying)


def test_wandb_and_mlflow_get_every_row_the_config_and_a_resume_continues_their_runs(
    shards, tmp_path, monkeypatch
):
    # Segment 1 logs rows at steps 2, 4, 6, checkpoints at 5, and dies in step 8.
    cfg1 = config(shards, tmp_path, **{"train.tracker": "wandb,mlflow", "train.checkpoint_every": 5})
    with monkeypatch.context() as m:
        crash_at(m, 8)
        with pytest.raises(RuntimeError, match="the machine died"):
            loop.train(cfg1)
    run_dir = tmp_path / "run"
    first = csv_rows(run_dir)
    assert [int(r["step"]) for r in first] == [2, 4, 6]
    state = json.loads((run_dir / "trackers.json").read_text())
    assert state["wandb"]["last_step"] == state["mlflow"]["last_step"] == 6
    client = mlflow_client(run_dir)
    assert client.get_run(state["mlflow"]["run_id"]).info.status == "FAILED"

    # Segment 2 resumes from step 5: it logs step 6 again to metrics.csv, not to the trackers.
    cfg2 = config(
        shards,
        tmp_path,
        **{"train.tracker": ["wandb", "mlflow"], "train.checkpoint_every": 5, "train.resume": "latest"},
    )
    loop.train(cfg2)
    second = csv_rows(run_dir)
    assert [int(r["step"]) for r in second] == [2, 4, 6, 8, 10, 12, 13]
    # What each tracker holds: the first segment's rows, then the resumed rows after step 6.
    expected = {**numeric_by_step(first), **{s: v for s, v in numeric_by_step(second).items() if s > 6}}
    assert json.loads((run_dir / "trackers.json").read_text()) == {
        "wandb": {"id": state["wandb"]["id"], "last_step": STEPS},
        "mlflow": {"run_id": state["mlflow"]["run_id"], "last_step": STEPS},
    }

    # W&B: two offline segments of one run id, each with its resolved config.
    seg1, seg2 = wandb_segments(run_dir)
    assert seg1["id"] == seg2["id"] == state["wandb"]["id"]
    assert seg1["config"] == json.loads(json.dumps(to_dict(cfg1)))
    assert seg2["config"] == json.loads(json.dumps(to_dict(cfg2)))
    assert (seg1["exit_code"], seg2["exit_code"]) == (1, 0)
    assert_same({**seg1["history"], **seg2["history"]}, expected)
    assert not set(seg1["history"]) & set(seg2["history"])
    assert seg2["summary"]["steps"] == STEPS and seg2["summary"]["samples_seen"] == SAMPLES
    assert seg2["summary"]["train_seconds"] > 0

    # MLflow: one run in <run>/mlruns; params = the resolved config of the run that created it.
    run_id = state["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert run.data.params == flat(to_dict(cfg1))
    assert_same(mlflow_history(client, run_id), expected)
    assert run.data.metrics["summary/samples_seen"] == SAMPLES
    files = {f.path for f in client.list_artifacts(run_id)}
    assert files == {"config.yaml", "curves.png", "checkpoints"}
    assert [f.path for f in client.list_artifacts(run_id, "checkpoints")] == [
        f"checkpoints/step_{STEPS:08d}.json"
    ]
    stored = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert stored.read_text() == (run_dir / "config.yaml").read_text()


def test_a_tracker_failing_mid_run_is_reported_once_and_training_goes_on(
    shards, tmp_path, monkeypatch, capsys
):
    real, calls = MlflowTracker.log, []

    def flaky(self: MlflowTracker, step: int, values: dict[str, float], prefix: str = "") -> None:
        calls.append(step)
        if len(calls) >= 2:
            raise OSError("test: store went away")
        real(self, step, values, prefix)

    monkeypatch.setattr(MlflowTracker, "log", flaky)
    run_dir = loop.train(config(shards, tmp_path, **{"train.tracker": "mlflow"}))
    err = capsys.readouterr().err
    assert err.count("warning: tracker mlflow failed") == 1 and "store went away" in err
    assert [int(r["step"]) for r in csv_rows(run_dir)] == [2, 4, 6, 8, 10, 12, 13]  # training went on
    assert calls == [2, 4]  # switched off after the failure
    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert state["last_step"] == 2
    client = mlflow_client(run_dir)
    assert sorted(mlflow_history(client, state["run_id"])) == [2]
    assert client.get_run(state["run_id"]).info.status == "FAILED"


def test_a_training_row_and_an_evaluation_row_at_one_step_make_one_tracker_step(shards, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    trackers = start_trackers(config(shards, tmp_path, **{"train.tracker": "wandb,mlflow"}), folder)
    rows = [
        {"step": 2, "samples_seen": 16, "epoch": 0, "loss": 2.5, "skipped": ""},
        {"step": 2, "samples_seen": 16, "epoch": 0, "zeroshot/tiny/acc1": 0.25, "eval_seconds": 0.5},
        {"step": 4, "samples_seen": 32, "epoch": 1, "loss": 2.0, "skipped": "decode_error=1"},
    ]
    for row in rows:
        trackers.log(row)
    trackers.finish(4, {"samples_seen": 32})
    expected = numeric_by_step([{k: str(v) for k, v in row.items()} for row in rows])
    (segment,) = wandb_segments(folder)
    assert_same(segment["history"], expected)
    state = json.loads((folder / "trackers.json").read_text())
    assert_same(mlflow_history(mlflow_client(folder), state["mlflow"]["run_id"]), expected)


def test_tracker_names():
    assert tracker_names("") == [] and tracker_names([]) == []
    assert tracker_names("wandb, mlflow") == ["wandb", "mlflow"]
    assert tracker_names(["mlflow"]) == ["mlflow"]
    assert from_dict(Config, {"train": {"tracker": "wandb,mlflow"}}).train.tracker == ["wandb,mlflow"]
    with pytest.raises(ConfigError, match="train.tracker: unknown tracker 'wandbb'; did you mean 'wandb'"):
        check_trackers(TrainConfig(tracker=["wandbb"]))
    with pytest.raises(ConfigError, match="twice"):
        tracker_names("mlflow,mlflow")


def test_a_missing_package_stops_the_run_before_any_work(shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(
        ClipkitError,
        match=r"train.tracker=wandb needs the 'wandb' package.*pip install 'clipkit\[tracking\]'",
    ):
        loop.train(config(shards, tmp_path, **{"train.tracker": "wandb"}))
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_cannot_start_is_an_error(shards, tmp_path):
    bad_uri = config(shards, tmp_path, **{"train.tracker": "wandb,mlflow", "train.tracker_uri": "nosuch://x"})
    (tmp_path / "a").mkdir()
    with pytest.raises(ClipkitError, match="train.tracker=mlflow: could not start"):
        start_trackers(bad_uri, tmp_path / "a")
    assert [s["exit_code"] for s in wandb_segments(tmp_path / "a")] == [1]  # W&B, started first, ended
    # A resumed run folder whose MLflow run is not in the store.
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "trackers.json").write_text(json.dumps({"mlflow": {"run_id": "0" * 32, "last_step": 4}}))
    resumed = config(shards, tmp_path, **{"train.tracker": "mlflow", "train.resume": "latest"})
    with pytest.raises(ClipkitError, match="MLflow run 0+ is not in .*train.tracker_uri"):
        start_trackers(resumed, folder)
