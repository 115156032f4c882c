"""A 2-CPU local Ray cluster for the ``--engine ray`` tests, and the faults they inject.

Faults kill a Ray worker process (SIGKILL, as the kernel's OOM killer or a lost node would)
in the middle of a task, the first time only: the first attempt creates a marker file and
dies; the retry finds the marker and runs through. ``KILL_DIR_ENV`` is set in the cluster's
workers only, so the same model spec never dies in the test process (the local engine).
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from index_helpers import ColorModel

from clipkit.data.download import Fetcher, FetchError

TESTS = Path(__file__).resolve().parent
KILL_DIR_ENV = "CLIPKIT_TEST_RAY_KILLS"


def start_cluster(kill_dir: Path):
    """``ray.init`` of a 2-CPU local cluster whose workers import this folder's helpers."""
    ray = pytest.importorskip(
        "ray", reason="the Ray engine is the optional extra clipkit[ray] (make test installs it)"
    )
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        address="local",  # a new cluster, even when `ray start` runs on this machine
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": path, KILL_DIR_ENV: str(kill_dir)}},
    )
    return ray


def die_once(marker: Path) -> None:
    """SIGKILL this process unless ``marker`` exists (and create it first)."""
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class FileFetcher(Fetcher):
    """Serves ``http://files/<absolute path>`` from the local disk (404 when missing); the
    process fetching ``kill_url`` dies once, keyed by the file ``marker``."""

    kill_url: str = ""
    marker: str = ""

    def fetch(self, url: str) -> bytes:
        if url == self.kill_url:
            die_once(Path(self.marker))
        try:
            return Path(url.removeprefix("http://files")).read_bytes()
        except FileNotFoundError:
            raise FetchError("http_404", url) from None


class DyingColorModel(ColorModel):
    """``ColorModel`` whose process dies at its second image batch, once per cluster (in a Ray
    worker only): the actor is then mid-part, with a batch embedded and others not."""

    def __init__(self) -> None:
        super().__init__(16)
        self.batches = 0

    def encode_image(self, image=None, image_features=None, normalize: bool = True):
        self.batches += 1
        if self.batches == 2 and os.environ.get(KILL_DIR_ENV):
            die_once(Path(os.environ[KILL_DIR_ENV]) / "embed")
        return super().encode_image(image, image_features, normalize)


def dying_color_model() -> DyingColorModel:
    return DyingColorModel()
