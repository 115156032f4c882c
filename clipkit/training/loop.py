"""``train(cfg) -> run folder``: the training loop of a dual encoder, on ``accelerate``.

    setup()  accelerator, seeds, run folder (+ resume), model, loss, AdamW groups, schedule,
             feature cache, data stream; writes config.yaml
    fit()    optimizer steps until ``train.samples`` have been seen: ``train_step`` (accumulation,
             clipping, AdamW, schedule), ``log`` every ``train.log_every`` steps, ``save_checkpoint``
             every ``train.checkpoint_every`` steps
    finish() last checkpoint, skipped-sample report, curves.png

Guards (``clipkit.training.safety``): shards and run folder are checked before the model is
built; a watchdog thread reports a loader that gives no batch for ``train.stall_timeout_s``;
a step with a non-finite loss or gradient is skipped (after ``train.max_nonfinite_steps`` in
a row the run stops, keeping its last good checkpoint); SIGTERM / SIGINT checkpoint at the
end of the step, then raise ``Interrupted`` (exit code 128 + signal in the CLI).

How the sample budget maps to steps and epochs, and what resume restores, is in
``clipkit.training.stream``; what a checkpoint holds in ``clipkit.training.run_state``, its
format in ``clipkit.training.checkpoint``; the plan and metrics rows in ``clipkit.training.report``.
Each loader batch is split (``stream.split_inputs``) into the model inputs, which alone reach
the model and the loss, and its bookkeeping (keys, epoch), which the sample log and the
sample count read.
Gradient accumulation is plain: each micro-batch is its own contrastive batch (negatives
within the micro-batch), its loss divided by the number of micro-batches of the step.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from tqdm import tqdm

from clipkit import allocator
from clipkit.config import Config, save_config
from clipkit.data import build_loader
from clipkit.errors import ClipkitError
from clipkit.losses import build_loss
from clipkit.losses.stats import embedding_stats
from clipkit.models import build_model
from clipkit.models.init import resolve_run_config
from clipkit.training import checkpoint as ckpt
from clipkit.training.compute import apply_grad_checkpointing, compile_model, compute_problems
from clipkit.training.evaluate import plan_evaluation, start_evaluation
from clipkit.training.feature_cache import FeatureCache, build_feature_cache, why_not_cached
from clipkit.training.gradcache import grad_cache_step
from clipkit.training.metrics import MetricsLog, plot_curves
from clipkit.training.optim import build_optimizer
from clipkit.training.partial_cache import partial_or_off
from clipkit.training.precision import (
    MIXED_PRECISION,
    optimizer_step,
    precision_problems,
    resolve_precision,
    scaler_kwargs_handlers,
    with_cpu_scaler,
)
from clipkit.training.report import add_to_window, log, plan_text, reset_window, skip_totals
from clipkit.training.run_state import checkpoint_state, restore
from clipkit.training.safety import (
    GracefulStop,
    Interrupted,
    NonFiniteSteps,
    Watchdog,
    check_run_folder,
    preflight_shards,
)
from clipkit.training.sample_log import SampleLog
from clipkit.training.schedule import build_scheduler
from clipkit.training.stream import BatchMeta, TrainStream, split_inputs, steps_for, trim
from clipkit.training.system import peak_memory_columns, system_info, write_system_json
from clipkit.training.trackers import Trackers, check_trackers, start_trackers


@dataclass
class Run:
    """Everything the loop carries from setup to finish."""

    cfg: Config
    acc: Accelerator
    run_dir: Path
    model: nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    loss_fn: nn.Module
    optimizer: Any
    scheduler: Any
    stream: TrainStream
    budget: int  # samples to see in total (all ranks)
    per_step: int  # samples of one full optimizer step (all ranks)
    total_steps: int
    cache_note: str = ""
    resumed_from: Path | None = None
    step: int = 0
    samples_seen: int = 0
    last_saved: int = -1
    metrics: MetricsLog | None = None
    window: dict[str, Any] = field(default_factory=dict)  # sums since the last log row
    nonfinite: NonFiniteSteps = field(default_factory=lambda: NonFiniteSteps(0))
    sample_log: SampleLog | None = None
    evaluator: Any = None  # clipkit.training.evaluate.Evaluator when an evaluation is configured
    stop: GracefulStop = field(default_factory=GracefulStop)
    system: dict[str, Any] = field(default_factory=dict)  # clipkit.training.system.system_info
    trackers: Trackers | None = None  # W&B / MLflow, rank 0 (clipkit.training.trackers)


# ---------------------------------------------------------------------------- setup


def check_train_config(cfg: Config) -> None:
    t, o = cfg.train, cfg.optim
    problems = []
    problems += precision_problems(t) + compute_problems(t)
    if t.samples < 1:
        problems.append(f"train.samples must be >= 1, got {t.samples}")
    if o.accum_steps < 1:
        problems.append(f"optim.accum_steps must be >= 1, got {o.accum_steps}")
    if cfg.data.batch_size < 1:
        problems.append(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if not cfg.data.train:
        problems.append(
            "data.train is empty: set the training shards, e.g. data/emoji/train (a folder of .tar shards)"
        )
    if t.threads < 0:
        problems.append(f"train.threads must be >= 0 (0 = torch's default), got {t.threads}")
    if t.resume == "latest" and not t.run_name:
        problems.append(
            "train.resume=latest continues the run folder <train.output_dir>/<train.run_name>, "
            "so train.run_name must be set (e.g. train.run_name=lit_emoji)"
        )
    if problems:
        raise ClipkitError("; ".join(problems))


def make_accelerator(precision: str) -> Accelerator:
    mixed = MIXED_PRECISION.get(precision, "no")
    known = AcceleratorState._shared_state.get("_mixed_precision", mixed)
    if known != mixed and not PartialState().use_distributed:
        # accelerate keeps one state per process; a second train() in the same process (a
        # notebook, the tests) with another precision would otherwise be refused.
        AcceleratorState._reset_state()
    handlers = scaler_kwargs_handlers() if mixed == "fp16" else None
    # cpu=False with CUDA: accelerate places the model on this rank's GPU and, under torchrun,
    # joins the NCCL process group; without CUDA, gloo.
    acc = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
    return with_cpu_scaler(acc)  # fp16 on CPU: the scaler and autocast accelerate gives a GPU


def seed_everything(seed: int, deterministic: bool) -> None:
    set_seed(seed)  # python, numpy, torch (all devices)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resolve_run_dir(cfg: Config, acc: Accelerator) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None)."""
    name = [cfg.train.run_name or time.strftime("%Y%m%d-%H%M%S")]
    if acc.num_processes > 1:
        broadcast_object_list(name)  # every rank uses rank 0's timestamp
    run_dir = Path(cfg.train.output_dir) / name[0]
    resume = cfg.train.resume
    if resume == "latest":
        found = ckpt.latest(run_dir)
        if found is None and ckpt.list_checkpoints(run_dir):
            raise ClipkitError(
                f"every checkpoint in {ckpt.checkpoint_dir(run_dir)} is damaged (see the warnings); "
                "delete them to start this run over"
            )
        return run_dir, found
    if resume:
        if not Path(resume).is_file():
            raise ClipkitError(f"train.resume={resume!r}: no such checkpoint file (or use 'latest')")
        return run_dir, Path(resume)
    if ckpt.list_checkpoints(run_dir) or (run_dir / "metrics.csv").exists():
        raise ClipkitError(
            f"run folder {run_dir} already holds a run; continue it with train.resume=latest "
            "or choose another train.run_name"
        )
    return run_dir, None


def budget_and_steps(cfg: Config, world: int) -> tuple[int, int, int]:
    """(samples budget, samples per full step, optimizer steps); see ``clipkit.training.stream``."""
    budget = -(-cfg.train.samples // world) * world  # every rank trains on as many samples
    per_step = cfg.data.batch_size * world * cfg.optim.accum_steps
    return budget, per_step, steps_for(budget, per_step)


def prepare_cache(
    cfg: Config, model: nn.Module, run_dir: Path, acc: Accelerator
) -> tuple[FeatureCache | None, str]:
    if reason := why_not_cached(cfg, model):  # unlocked top layers of a locked tower: a partial cache?
        return partial_or_off(cfg, model, run_dir, acc, reason)
    with acc.main_process_first():  # rank 0 computes, the others then find it complete
        cache, report = build_feature_cache(
            model, cfg.data, cfg.data.train, run_dir, acc.device, progress=acc.is_local_main_process,
            precision=cfg.train.feature_cache_precision, views=cfg.train.cache_views,
        )  # fmt: skip
    return cache, f"on: {report}"


def make_stream(cfg: Config, model: nn.Module, acc: Accelerator, cache: FeatureCache | None) -> TrainStream:
    transform = None if cache is not None else model.image_transform(train=True)

    def loader(seed: int, epoch: int, resume: dict[str, Any] | None) -> Any:
        return build_loader(
            cfg.data, cfg.data.train, transform, model.tokenize, train=True, seed=seed,
            rank=acc.process_index, world_size=acc.num_processes, feature_lookup=cache, epoch=epoch,
            resume=resume,
        )  # fmt: skip

    def all_ranks_have(ok: bool) -> bool:
        if acc.num_processes == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() == acc.num_processes)

    return TrainStream(
        loader, cfg.data.batch_size, cfg.train.seed, all_ranks_have=all_ranks_have,
        # hard-negative passes are mined with the model at their start: never opened early
        open_ahead=cfg.data.open_next_pass_early and cfg.data.hard_negatives.k == 0,
    )  # fmt: skip


def setup(cfg: Config) -> Run:
    cfg = resolve_precision(resolve_run_config(cfg))  # model.init -> towers and heads; precision=auto
    check_train_config(cfg)
    evaluation = plan_evaluation(cfg)  # opens the eval datasets, checks train.keep_best: before any work
    check_trackers(cfg.train)  # tracker names known, packages installed: before any work
    allocator.tune()  # freed tensors stay in the process for the next step (clipkit.allocator)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    acc = make_accelerator(cfg.train.precision)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    with warnings.catch_warnings():
        if not acc.is_main_process:  # errors stop every rank; a warning is printed once
            warnings.simplefilter("ignore")
        preflight_shards(cfg.data, acc.num_processes)
    run_dir, resume_from = resolve_run_dir(cfg, acc)
    state = ckpt.load(resume_from) if resume_from else None
    model = build_model(cfg.model).to(acc.device)
    if state is not None:  # before the feature cache: its key is the vision weights' fingerprint
        ckpt.load_model_state(model, state["model"], str(resume_from), state.get("config", {}))
    checkpointed = apply_grad_checkpointing(model) if cfg.train.grad_checkpointing else []
    loss_fn = build_loss(cfg.loss).to(acc.device)
    if hasattr(loss_fn, "attach"):  # a loss that needs the model (albef_md's EMA copy, a teacher's checks)
        loss_fn.attach(model)
    seed_everything(cfg.train.seed + acc.process_index, cfg.train.deterministic)  # per-rank dropout etc.
    optimizer = build_optimizer(model, cfg.model, cfg.optim, loss_fn, scaler=cfg.train.precision == "fp16")
    budget, per_step, total_steps = budget_and_steps(cfg, acc.num_processes)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    if acc.is_main_process:
        check_run_folder(run_dir, ckpt.estimated_size(model))  # fail now, not at the first checkpoint
        stale = ckpt.remove_temporaries(run_dir)
        if stale:
            print(
                f"note: removed {len(stale)} unfinished checkpoint write(s) of a killed run ({stale[0]}, ...)"
            )
        save_config(cfg, run_dir / "config.yaml")
    cache, cache_note = prepare_cache(cfg, model, run_dir, acc)
    stream = make_stream(cfg, model, acc, cache)
    if cfg.data.hard_negatives.k > 0:  # Sample4Geo passes: neighbours share a batch
        from clipkit.data.hard_negatives import HardNegativeSampler

        stream.make_loader = HardNegativeSampler(cfg.data, model, acc, cache, stream.make_loader)
    run = Run(cfg, acc, run_dir, model, loss_fn, optimizer, scheduler, stream, budget, per_step, total_steps)
    run.cache_note, run.resumed_from = cache_note, resume_from
    run.nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps)
    if state is not None:
        restore(run, state)
    if cfg.train.compile:
        compile_model(model, cfg.train.compile_backend)
    run.model, run.optimizer = acc.prepare(model, optimizer)
    run.system = system_info(acc, cfg.train, checkpointed)
    if acc.is_main_process:
        write_system_json(run_dir, run.system)
        run.trackers = start_trackers(cfg, run_dir)  # a resume continues trackers.json's runs
        # Resuming (even from no checkpoint): rows and events past the restored step are stale.
        run.metrics = MetricsLog(
            run_dir, resume_step=run.step if cfg.train.resume else None, trackers=run.trackers
        )
    acc.wait_for_everyone()  # the run folder exists on every rank
    if cfg.train.log_sample_ids:
        run.sample_log = SampleLog(
            run_dir, acc.process_index, resumed_step=run.step if cfg.train.resume else None
        )
    run.evaluator = start_evaluation(evaluation, run)
    if state is not None:  # last, so that nothing built above consumes the restored streams
        rngs = state["rng"]
        ckpt.restore_rng(rngs[acc.process_index] if acc.process_index < len(rngs) else rngs[0])
    return run


# ---------------------------------------------------------------------------- one step


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def next_micro_batches(run: Run) -> list[tuple[dict[str, Any], BatchMeta]]:
    """This rank's micro-batches of the next step, each as (model inputs, bookkeeping: keys and
    the pass it came from); the last step's are cut to the budget."""
    world, size = run.acc.num_processes, run.cfg.data.batch_size
    left = run.budget - run.samples_seen
    micro = []
    while len(micro) < run.cfg.optim.accum_steps and left > 0:
        batch = run.stream.next_batch()
        take = min(size, left // world)
        micro.append(split_inputs(batch if take == size else trim(batch, take), epoch=run.stream.epoch))
        left -= take * world
    return micro


def all_ranks_agree(run: Run, flag: bool) -> bool:
    """True when ``flag`` is true on every rank (a collective with several ranks)."""
    if run.acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=run.acc.device)
    return bool(run.acc.reduce(t, reduction="sum").item() == run.acc.num_processes)


def train_step(run: Run, micro: list[dict[str, Any]], with_stats: bool) -> dict[str, float]:
    """Forward/backward over the micro-batches (their model inputs only, ``split_inputs``),
    clip, AdamW step, schedule step; returns scalars."""
    acc, model = run.acc, run.model
    model.train()
    sums: dict[str, float] = {}
    for i, batch in enumerate(micro):
        batch = to_device(batch, acc.device)
        sync = i == len(micro) - 1  # DDP all-reduces gradients only on the last micro-batch
        chunk = run.cfg.train.grad_cache_micro_batch
        if chunk > 0:  # gradient caching: the loss sees the whole batch, towers run `chunk` at a time
            res = grad_cache_step(
                model, run.loss_fn, batch, micro_batch=chunk, loss_scale=1 / len(micro),
                backward=acc.backward, no_sync=acc.no_sync, sync=sync,
            )  # fmt: skip
            losses, out = res["losses"], res["out"]
        else:
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                out = model(batch)
                losses = run.loss_fn(out, batch)
                acc.backward(losses["loss"] / len(micro))
        for k, v in losses.items():
            if torch.is_tensor(v) and v.numel() == 1:
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else math.inf
    grad_norm = acc.clip_grad_norm_(params, clip)
    # A non-finite loss or gradient (on any rank) skips the update: parameters, optimizer
    # moments and loss state stay as they were; the schedule still advances with the step.
    # Under fp16, overflowing gradients are the scaler's (clipkit.training.precision).
    finite = all(map(math.isfinite, sums.values()))
    done = optimizer_step(acc, run.optimizer, float(grad_norm), finite, lambda ok: all_ranks_agree(run, ok))
    if done["updated"] and hasattr(run.loss_fn, "after_step"):  # e.g. albef_md's EMA of its momentum model
        run.loss_fn.after_step(acc.unwrap_model(model))
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    result = {**sums, "grad_norm": float(grad_norm), "logit_scale": float(out["logit_scale"].detach())}
    result["nonfinite"], result["overflow"] = float(done["nonfinite"]), float(done["overflow"])
    if out.get("logit_bias") is not None:
        result["logit_bias"] = float(out["logit_bias"].detach())
    if with_stats:  # geometry of the last micro-batch's embeddings
        stats = embedding_stats(out["image_emb"].detach().float(), out["text_emb"].detach().float())
        result.update({k: float(v) for k, v in stats.items()})
    return result


# ---------------------------------------------------------------------------- logging


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run) -> None:
    model = run.acc.unwrap_model(run.model)
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:  # never a checkpoint that would replace the last good one with NaN weights
        raise ClipkitError(
            f"step {run.step}: parameters {', '.join(bad[:3])} hold NaN or inf after a finite update; "
            f"no checkpoint written, the last good one is kept ({ckpt.latest(run.run_dir)}); lower optim.lr "
            "or set optim.grad_clip"
        )
    state = checkpoint_state(run)  # every rank: the RNG gather is a collective
    if run.acc.is_main_process:
        ckpt.save(run.run_dir, run.step, state, keep_last=run.cfg.train.keep_last)
    run.last_saved = run.step
    run.acc.wait_for_everyone()


# ---------------------------------------------------------------------------- the loop


def stop_if_asked(run: Run) -> None:
    """After a signal (on any rank): checkpoint this step, then raise ``Interrupted`` (during the
    last step the run simply finishes)."""
    if not all_ranks_agree(run, run.stop.signum is None) and run.samples_seen < run.budget:
        if run.last_saved != run.step:
            save_checkpoint(run)
        signum = run.stop.signum or signal.SIGTERM  # a rank without the signal follows the others
        where = ckpt.checkpoint_path(run.run_dir, run.step)
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} after step {run.step}; checkpoint {where}; "
            "continue with train.resume=latest",
            exit_code=128 + signum,
        )


def fit(run: Run) -> None:
    cfg = run.cfg
    bar = tqdm(
        total=run.total_steps, initial=run.step, unit="step", dynamic_ncols=True,
        disable=not run.acc.is_local_main_process,
    )  # fmt: skip
    reset_window(run)
    watchdog = Watchdog(
        cfg.train.stall_timeout_s,
        lambda: run.stream.waiting_since,
        lambda: f"rank {run.acc.process_index}: {run.stream.waiting_on()}",
    )
    with watchdog, run.stop.installed():
        while run.samples_seen < run.budget:
            micro = next_micro_batches(run)
            samples = sum(len(meta) for _, meta in micro) * run.acc.num_processes
            done = run.samples_seen + samples >= run.budget
            log_now = _every(cfg.train.log_every, run.step + 1) or done
            result = train_step(run, [inputs for inputs, _ in micro], with_stats=log_now)
            run.step += 1
            run.samples_seen += samples
            run.stream.count_sources(meta for _, meta in micro)  # resampled mixtures: per source
            if run.sample_log is not None:
                run.sample_log.write(run.step, [(meta.epoch, x["idx"].tolist()) for x, meta in micro])
            add_to_window(run, result, samples)
            note = run.nonfinite.count(run.step, result, lambda: ckpt.latest(run.run_dir))
            if note and run.acc.is_main_process:
                print(note, file=sys.stderr, flush=True)
            rate = run.window["samples"] / max(time.perf_counter() - run.window["t0"], 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{result['loss']:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            if log_now:
                log(run, result)
                reset_window(run)
            if run.evaluator is not None:  # every eval.every_samples and after the last step; keep_best
                run.evaluator.after_step(run, samples, done)
            if _every(cfg.train.checkpoint_every, run.step) and not done:
                t0 = time.perf_counter()
                save_checkpoint(run)
                run.window["t0"] += time.perf_counter() - t0  # samples/s measures training, not saving
            stop_if_asked(run)
    bar.close()


def finish(run: Run, seconds: float) -> None:
    if run.last_saved != run.step:
        save_checkpoint(run)
    if run.sample_log is not None:
        run.sample_log.close()
    skips, dropped = skip_totals(run)
    memory = peak_memory_columns(run.acc)  # a collective: every rank
    if not run.acc.is_main_process:
        return
    assert run.metrics is not None
    run.metrics.close()
    plot_curves(run.run_dir)
    if run.trackers is not None:  # after curves.png, which MLflow keeps
        summary = {"samples_seen": run.samples_seen, "train_seconds": seconds, "skipped_total": skips.total}
        run.trackers.finish(run.step, summary)
    print(
        f"done: step {run.step}, {run.samples_seen:,} samples seen in {seconds:.1f} s "
        f"({', '.join(f'{k} {v:.2f}' for k, v in memory.items())}); {skips.report()}"
        + (f"; {dropped} samples of short batches dropped" if dropped else "")
    )


def train(cfg: Config) -> Path:
    """Train per ``cfg``; returns the run folder (config.yaml, checkpoints/, metrics.csv, tb/, curves.png)."""
    run = setup(cfg)
    if run.acc.is_main_process:
        print(plan_text(run), flush=True)
    t0 = time.perf_counter()
    try:
        fit(run)
        finish(run, time.perf_counter() - t0)
    except BaseException:
        if run.trackers is not None:  # the tracker runs end as failed; a resume continues them
            run.trackers.close()
        raise
    finally:
        run.stream.close()  # the loader workers stop here, not at the interpreter's exit
    return run.run_dir
