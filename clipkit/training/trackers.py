"""Experiment trackers beside metrics.csv: W&B in offline mode, MLflow with a local file store.

``train.tracker`` names zero or more of ``TRACKERS`` (``"wandb"``, ``"mlflow"``; a list or a
comma-separated string). Neither package is a dependency of clipkit: ``pip install
'clipkit[tracking]'``. Only rank 0 tracks. What a tracker gets:

    start    the resolved config (W&B: the nested tree; MLflow: params with dotted keys)
    log      every numeric column of each metrics.csv row, at step = the row's optimizer step
    finish   a summary (steps, samples seen, seconds, skipped samples); MLflow also stores
             config.yaml, curves.png and the final checkpoint's sidecar as artifacts

Nothing leaves the machine: W&B runs with ``mode="offline"`` into ``<run>/wandb/`` (upload
later with ``wandb sync``), MLflow writes to ``<run>/mlruns`` unless ``train.tracker_uri``
names another store; both packages' own telemetry is off unless the user's environment asks.

Resume: ``<run>/trackers.json`` holds each tracker's run id and the last step it was sent. A
run resumed in the same folder continues the same tracker runs; the steps it replays (those
between the checkpoint and the crash) are not sent again, so a tracker holds one value per step,
the first one logged. A run started from a checkpoint of another folder gets new tracker runs.

Failures: a tracker that cannot start (not installed, bad URI, lost run id) stops the run before
its first step; one that fails later is reported once and switched off, and training goes on
(metrics.csv keeps every row).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from clipkit.config import Config, ConfigError, TrainConfig, to_dict
from clipkit.data.atomic import atomic_write_text
from clipkit.errors import ClipkitError
from clipkit.registry import Registry, UnknownNameError
from clipkit.training import checkpoint as ckpt

TRACKERS = Registry("tracker")
STATE_FILE = "trackers.json"
INSTALL_HINT = "pip install 'clipkit[tracking]'"


def tracker_names(value: str | list[str]) -> list[str]:
    """``train.tracker`` as a list of registered names: ``"wandb,mlflow"`` or ``["mlflow"]``; ``""`` = none."""
    items = [value] if isinstance(value, str) else value
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    for name in names:
        try:
            TRACKERS.get(name)
        except UnknownNameError as err:
            raise ConfigError(f"train.tracker: {err}") from None
    if len(set(names)) != len(names):
        raise ConfigError(f"train.tracker names a tracker twice: {value!r}")
    return names


def check_trackers(train: TrainConfig) -> None:
    """Before any work (every rank): the names are known and their packages import."""
    for name in tracker_names(train.tracker):
        TRACKERS.get(name).load_package()


def start_trackers(cfg: Config, run_dir: Path) -> Trackers | None:
    """The run's trackers (rank 0), or None when ``train.tracker`` is empty."""
    names = tracker_names(cfg.train.tracker)
    return Trackers(names, cfg, Path(run_dir), resuming=bool(cfg.train.resume)) if names else None


class Trackers:
    """Forwards metrics rows to each tracker, keeps ``trackers.json``, and isolates failures."""

    def __init__(self, names: list[str], cfg: Config, run_dir: Path, resuming: bool):
        self.run_dir, self.path = run_dir, run_dir / STATE_FILE
        self.saved: dict[str, dict[str, Any]] = {}
        if resuming and self.path.is_file():
            self.saved = json.loads(self.path.read_text())
        tree = to_dict(cfg)
        self.active: dict[str, Tracker] = {}
        # Per tracker, the last step an earlier segment of this run sent: a resume replays the
        # steps after its checkpoint, and those up to here are not sent again.
        self.sent_before: dict[str, int] = {}
        self.this_step: tuple[int, dict[str, float]] = (-1, {})  # (step, values sent at it)
        for name in names:
            previous = self.saved.get(name)
            try:
                self.active[name] = TRACKERS.get(name)(run_dir, tree, cfg.train, previous)
            except Exception as err:  # a misconfiguration at start stops the run
                self.close()  # the trackers already started end as failed
                if isinstance(err, ClipkitError):
                    raise
                raise ClipkitError(
                    f"train.tracker={name}: could not start ({type(err).__name__}: {err})"
                ) from err
            self.sent_before[name] = int((previous or {}).get("last_step", -1))
            self.saved[name] = {**self.active[name].state(), "last_step": self.sent_before[name]}
            print(f"tracking: {self.active[name].describe()}", flush=True)
        self._save()

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row: its numeric columns at step ``row["step"]``. A second row at the same
        step (the evaluation after a training row) adds its own columns; the ones it repeats
        with the same value (samples_seen, epoch) are not sent twice."""
        step = int(row["step"])
        if step != self.this_step[0]:
            self.this_step = (step, {})
        sent = self.this_step[1]
        values = {
            k: v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and sent.get(k) != v
        }
        sent.update(values)
        if not values:
            return
        for name, tracker in list(self.active.items()):
            if step <= self.sent_before[name]:
                continue  # replayed after a resume: the tracker has this step already
            try:
                tracker.log(step, values)
            except Exception as err:  # noqa: BLE001 - never stops training: reported once, tracker off
                self._drop(name, f"at step {step}", err)
                continue
            self.saved[name]["last_step"] = max(step, self.saved[name]["last_step"])
        self._save()

    def finish(self, step: int, summary: dict[str, Any]) -> None:
        """End every tracker run: ``summary`` plus the run's files (config, curves, final sidecar)."""
        files = [
            self.run_dir / "config.yaml",
            self.run_dir / "curves.png",
            ckpt.sidecar_path(ckpt.checkpoint_path(self.run_dir, step)),
        ]
        for name, tracker in list(self.active.items()):
            try:
                tracker.finish({"steps": step, **summary}, [f for f in files if f.is_file()], ok=True)
            except Exception as err:  # noqa: BLE001 - the run is complete; its files are all on disk
                self._drop(name, "while finishing", err)
        self.active.clear()

    def close(self, ok: bool = False) -> None:
        """End the tracker runs of a run that stopped early (they are marked failed; resume continues them)."""
        for name, tracker in list(self.active.items()):
            try:
                tracker.finish({}, [], ok=ok)
            except Exception as err:  # noqa: BLE001 - already failing: report and keep the original error
                self._drop(name, "while closing", err)
        self.active.clear()

    def _drop(self, name: str, where: str, err: Exception) -> None:
        tracker = self.active.pop(name)
        # Best effort to mark its run failed (MLflow would show it running forever); the error
        # that matters is the one reported below.
        with contextlib.suppress(Exception):
            tracker.finish({}, [], ok=False)
        print(
            f"warning: tracker {name} failed {where} ({type(err).__name__}: {err}); it is off for the rest "
            "of this run, training goes on and metrics.csv keeps every row",
            file=sys.stderr,
            flush=True,
        )

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.saved, indent=1) + "\n")


class Tracker(ABC):
    """One tracker run, built as ``cls(run_dir, config_tree, cfg.train, previous)``; ``previous`` is
    its entry of trackers.json when the run resumes (the run id to continue), else None."""

    module = ""  # the package to import

    @classmethod
    def load_package(cls) -> Any:
        try:
            return importlib.import_module(cls.module)
        except ImportError as err:
            name = cls.registry_name  # type: ignore[attr-defined]
            raise ClipkitError(
                f"train.tracker={name} needs the '{cls.module}' package, which is not installed ({err}); "
                f"install it with: {INSTALL_HINT}"
            ) from err

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """What a resume needs to continue this tracker run (its id), saved in trackers.json."""

    @abstractmethod
    def describe(self) -> str:
        """Where the run is logged, for the start of the training log."""

    @abstractmethod
    def log(self, step: int, values: dict[str, float]) -> None: ...

    @abstractmethod
    def finish(self, summary: dict[str, Any], files: list[Path], ok: bool) -> None:
        """End the tracker run: ``ok`` false marks it failed (a resume continues it)."""


@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    """A W&B run in offline mode under ``<run>/wandb/offline-run-<time>-<id>/``; resume reuses the id."""

    module = "wandb"

    @classmethod
    def load_package(cls) -> Any:
        # W&B's error reports would reach its servers even offline; off unless the user set it.
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        return super().load_package()

    def __init__(self, run_dir: Path, config: dict[str, Any], train: TrainConfig, previous: dict | None):
        wandb = self.load_package()
        run_id = (previous or {}).get("id")
        self.run = wandb.init(
            mode="offline",  # wins over WANDB_MODE: nothing is sent
            dir=str(run_dir),
            project=train.tracker_project,
            name=run_dir.name,
            id=run_id,
            resume="allow" if run_id else None,
            config=config,
        )
        self.folder = Path(self.run.dir).parent  # the .wandb file and logs; `files/` is inside

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id}

    def describe(self) -> str:
        return f"W&B offline run {self.run.id} in {self.folder} (`wandb sync` it to upload)"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict[str, Any], files: list[Path], ok: bool) -> None:
        if summary:
            self.run.summary.update(summary)
        self.run.finish(exit_code=0 if ok else 1)


# MLflow's rules for metric keys; any other character becomes "_".
_MLFLOW_KEY = re.compile(r"[^\w./\- :]")
_MLFLOW_PARAM_CHARS = 6000  # MLflow refuses longer param values


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config tree as MLflow params: dotted keys, values as ``str`` (an empty dict stays ``"{}"``)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:_MLFLOW_PARAM_CHARS]
    return out


@TRACKERS.register("mlflow")
class MlflowTracker(Tracker):
    """An MLflow run in ``train.tracker_uri`` (default: the file store ``<run>/mlruns``)."""

    module = "mlflow"

    @classmethod
    def load_package(cls) -> Any:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
        return super().load_package()

    def __init__(self, run_dir: Path, config: dict[str, Any], train: TrainConfig, previous: dict | None):
        self.load_package()
        self.uri = train.tracker_uri or (run_dir / "mlruns").resolve().as_uri()
        if urlparse(self.uri).scheme in ("", "file"):
            # MLflow 3 keeps the file store in maintenance mode behind this switch; it is the
            # store that needs no server and no database package.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        params = flat_params(config)
        run_id = (previous or {}).get("run_id")
        if run_id:
            try:
                known = self.client.get_run(run_id).data.params
            except Exception as err:
                raise ClipkitError(
                    f"train.tracker=mlflow: this run folder's MLflow run {run_id} is not in {self.uri} ({err}); "
                    f"set train.tracker_uri to the store it was logged to, or delete {run_dir / STATE_FILE} "
                    "to start a new MLflow run"
                ) from err
            self.client.update_run(run_id, status="RUNNING")
            params = {k: v for k, v in params.items() if k not in known}  # MLflow params never change
        else:
            name = train.tracker_project
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        self.run_id = run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(run_id, params=items[i : i + 100])

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri}"

    def log(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", prefix + k), float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any], files: list[Path], ok: bool) -> None:
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and k != "steps"}
        if numbers:  # under summary/: the rows' own keys keep one value per step
            self.log(int(summary["steps"]), numbers, prefix="summary/")
        for path in files:
            folder = "checkpoints" if path.parent.name == "checkpoints" else None
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")
