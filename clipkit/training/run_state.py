"""A run's state in a checkpoint: ``checkpoint_state`` captures it, ``restore`` puts it back.

The file format and atomic writing are ``clipkit.training.checkpoint``'s; the data stream's
part (each worker's position, for exact resume) is ``clipkit.training.stream``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from accelerate.utils import gather_object

from clipkit.config import to_dict
from clipkit.errors import ClipkitError
from clipkit.training import checkpoint as ckpt
from clipkit.training.precision import load_scaler_state, scaler_state

if TYPE_CHECKING:
    from clipkit.training.loop import Run


def checkpoint_state(run: Run) -> dict[str, Any]:
    """Everything a resume needs (see ``clipkit.training.checkpoint``)."""
    model = run.acc.unwrap_model(run.model)
    rngs = gather_object([ckpt.capture_rng()]) if run.acc.num_processes > 1 else [ckpt.capture_rng()]
    stream = run.stream.state_dict()
    streams = gather_object([stream]) if run.acc.num_processes > 1 else [stream]
    return {
        "model": model.state_dict(),  # full: a checkpoint alone rebuilds the model
        # Trainable subset (shares storage with "model": costs no bytes in the file).
        "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loss": run.loss_fn.state_dict(),
        "step": run.step,
        "samples_seen": run.samples_seen,
        "epoch": run.stream.epoch,
        "skipped": dict(run.stream.skip.by_kind),
        "skip_seen": run.stream.skip.seen,
        "dropped": run.stream.dropped,
        "nonfinite": run.nonfinite.total,
        "grad_scaler": scaler_state(run.acc),  # fp16: scale and growth tracker; else None
        "scaler_skipped": run.nonfinite.overflows,
        "rng": rngs,  # one entry per rank
        "stream": streams,  # one entry per rank: each worker's position (exact resume)
        "config": to_dict(run.cfg),
    }


def restore(run: Run, state: dict[str, Any]) -> None:
    """Put a checkpoint's state into the (not yet prepared) optimizer, schedule, loss and counters."""
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:
        raise ClipkitError(
            f"checkpoint {run.resumed_from}: the optimizer state does not fit ({err}); the trainable "
            "parameters differ, check model.<tower>.locked / unlocked_layers against the checkpoint's config"
        ) from err
    run.scheduler.load_state_dict(state["scheduler"])
    run.loss_fn.load_state_dict(state["loss"])
    run.step = run.last_saved = int(state["step"])
    run.samples_seen = int(state["samples_seen"])
    run.nonfinite.total = int(state.get("nonfinite", 0))
    run.nonfinite.overflows = int(state.get("scaler_skipped", 0))
    load_scaler_state(run.acc, state.get("grad_scaler"))
    streams = state.get("stream") or []
    mine = streams[run.acc.process_index] if run.acc.process_index < len(streams) else {}
    if mine.get("positions") is not None:  # exact: each worker goes on where it was
        run.stream.load_state_dict(mine)
    else:  # no positions (an older checkpoint, a hard-negative pass): reseed with (seed, epoch, step)
        run.stream.epoch, run.stream.start_step = int(state["epoch"]), run.step
        run.stream.sources_seen = [int(n) for n in mine.get("sources", [])]
        if run.acc.is_main_process:
            print(
                f"note: the checkpoint holds no exact data-stream position; epoch {run.stream.epoch} restarts reseeded"
            )
    run.stream.skip.by_kind.update(state.get("skipped", {}))
    run.stream.skip.seen = int(state.get("skip_seen", 0))
    run.stream.dropped = int(state.get("dropped", 0))
    changed = _config_changes(state.get("config", {}), to_dict(run.cfg))
    if changed and run.acc.is_main_process:
        print(f"note: config differs from the checkpoint's in {', '.join(changed)} (the current one is used)")


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "args":
            out += _config_changes(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "train.resume":
            out.append(f"{prefix}{key}")
    return out
