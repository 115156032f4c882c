"""``train.keep_best``: keep ``checkpoints/best.pt``, the checkpoint with the best evaluation metric.

The rule: a metric whose last name part starts with ``loss`` (``val/loss``, ``val/loss_i2t``) is
minimised, every other one (accuracies, recalls, mean per-class recall) maximised. A value
replaces the best only when strictly better and finite, so a tie keeps the earlier step.

``best.pt`` is a full checkpoint (``run_state.checkpoint_state``, resumable like any other),
written atomically with its sidecar ``best.json`` = the usual sidecar plus ``metric`` and
``value`` (``clipkit.training.checkpoint.save_best``); ``latest()`` and pruning never see it. A
resumed run starts from the value in ``best.json`` (rank 0 reads it, every rank receives it),
so it never replaces a better ``best.pt`` with a worse one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate.utils import broadcast_object_list

from clipkit.training import checkpoint as ckpt

if TYPE_CHECKING:
    from clipkit.training.loop import Run


def minimised(metric: str) -> bool:
    """True for losses (``val/loss``, ``val/loss_t2i``): smaller is better."""
    return metric.rsplit("/", 1)[-1].startswith("loss")


@dataclass
class BestKeeper:
    metric: str
    value: float | None = None  # best so far (None: nothing evaluated yet)
    step: int | None = None

    def better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value < self.value if minimised(self.metric) else value > self.value

    @classmethod
    def resume(cls, run_dir: Path, metric: str, num_processes: int, main: bool) -> BestKeeper:
        """The keeper of a (possibly resumed) run: the best so far from ``best.json`` when it is
        about the same metric."""
        info: list[Any] = [ckpt.read_best(run_dir) if main else None]
        if num_processes > 1:
            broadcast_object_list(info)  # every rank decides alike (checkpoint_state is a collective)
        found = info[0]
        if found is None:
            return cls(metric)
        if found.get("metric") != metric:
            if main:
                print(
                    f"note: {ckpt.best_path(run_dir)} is the best by {found.get('metric')!r}, not "
                    f"train.keep_best={metric!r}; the first evaluation replaces it"
                )
            return cls(metric)
        return cls(metric, float(found["value"]), int(found["step"]))

    def offer(self, run: Run, value: float) -> bool:
        """Write ``best.pt`` when ``value`` (this step's, the same on every rank) is better; all
        ranks call it. Returns True when it was written."""
        if not self.better(value):
            return False
        from clipkit.training.run_state import checkpoint_state

        state = checkpoint_state(run)  # every rank: the RNG gather is a collective
        if run.acc.is_main_process:
            ckpt.save_best(run.run_dir, run.step, state, self.metric, value)
        self.value, self.step = value, run.step
        run.acc.wait_for_everyone()
        return True
