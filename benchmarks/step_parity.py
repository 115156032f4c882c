"""clipkit's training step beside open_clip_train's, from the same weights on the same batches.

The harness of ``tests/test_openclip_step_parity.py`` at a benchmark's size: an open_clip model
config (default ViT-S-32-alt at 128 px, context 32, as ``train_throughput.py --setups small``),
the emoji training shards, batches of 64, lr 1e-3 with 10 warmup steps of a 128-step cosine,
weight decay 0.1, clipping at 1.0. Each step prints both losses and gradient norms and the
largest weight difference of the image tower. No target: it shows whether a loss difference
between the two trainers comes from the math (it does not) or from what each run is fed.
Target: the largest loss difference over the steps <= 1e-4 (exit status 1 when missed).

    .venv/bin/python benchmarks/step_parity.py --record           # ViT-S-32-alt, 30 steps
    .venv/bin/python benchmarks/step_parity.py --arch clipkit-tiny-ViT --image-size 32 --context 16 --embed-dim 32
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record

TARGET = 1e-4  # largest |loss difference| over the steps


def open_clip_twin(model, arch: str, image_size: int, context: int):
    """open_clip's ``CLIP`` for ``arch`` holding the weights of clipkit's DualEncoder ``model``
    (whose towers are open_clip's modules). Raises when they do not map one to one."""
    import open_clip

    twin = open_clip.create_model(arch, force_image_size=image_size, force_context_length=context)
    weights = {"visual." + k: v for k, v in model.vision.model.state_dict().items()}
    weights |= model.text.model.state_dict()
    weights["logit_scale"] = model.logit_scale.detach().clone()
    missing, unexpected = twin.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the towers do not map onto open_clip's CLIP: missing {missing}, unexpected {unexpected}"
        )
    return twin


def open_clip_train_decays(name: str, p) -> bool:
    """open_clip_train.main's weight-decay rule (its ``exclude``, negated)."""
    return not (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)


class OpenClipTrainStep:
    """open_clip_train's training step, written out with open_clip's own pieces: ``CLIP.forward``
    (full-context text), ``open_clip.ClipLoss``, torch's default AdamW over its two groups, its
    warmup-cosine lr (``open_clip_train.scheduler.cosine_lr``) set before the step,
    ``clip_grad_norm_`` over every parameter, then the in-place clamp of ``logit_scale``."""

    def __init__(self, model, lr: float, weight_decay: float, warmup: int, total: int, clip: float = 1.0):
        import open_clip
        import torch

        named = list(model.named_parameters())
        groups = [
            {"params": [p for n, p in named if not open_clip_train_decays(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if open_clip_train_decays(n, p)], "weight_decay": weight_decay},
        ]
        self.model, self.loss = model, open_clip.ClipLoss()
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
        self.lr, self.warmup, self.total, self.clip = lr, warmup, total, clip

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / (self.total - self.warmup))) * self.lr

    def __call__(self, step: int, images, text):
        """One update on the batch; returns (loss, gradient norm before clipping)."""
        import torch

        self.model.train()
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        loss = self.loss(*self.model(images, text))
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return loss.detach(), grad


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-S-32-alt")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--total-steps", type=int, default=128, help="length of the schedule")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    p.add_argument("--shards", default=str(ROOT / "data" / "emoji" / "train"), help="folder of .tar shards")
    _record.add_record_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from clipkit.config import load_config
    from clipkit.data import build_loader
    from clipkit.losses import build_loss
    from clipkit.models import build_model
    from clipkit.training.optim import build_optimizer
    from clipkit.training.schedule import build_scheduler
    from clipkit.training.stream import split_inputs

    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    shards = sorted(Path(opts.shards).glob("*.tar"))
    if not shards:
        print(
            f"no .tar shards in {opts.shards}: build them with `python -m data_tools.build_emoji --out data/emoji`"
        )
        return 2
    a, lr = opts.arch, opts.lr
    cfg = load_config(
        None,
        [
            f"model.vision.name=open_clip:{a}", f"model.text.name=open_clip:{a}", "model.vision.weights=",
            "model.text.weights=", "model.vision.locked=false", "model.text.locked=false",
            f"model.vision.image_size={opts.image_size}", f"model.text.context_length={opts.context}",
            f"model.embed_dim={opts.embed_dim}", "model.vision.augment=true", "model.projection=none",
            "loss.name=clip", f"optim.lr={lr}", "optim.weight_decay=0.1", "optim.beta1=0.9",
            "optim.beta2=0.98", "optim.eps=1.0e-06", f"optim.warmup_steps={opts.warmup}",
            "optim.min_lr_ratio=0.0", "optim.grad_clip=1.0", "data.batch_size=64", "data.workers=0",
            "data.train=" + "::".join(str(s) for s in shards),
        ],
    )  # fmt: skip
    torch.manual_seed(opts.seed)
    ck = build_model(cfg.model)
    try:
        oc = open_clip_twin(ck, a, opts.image_size, opts.context)
    except ValueError as err:
        print(err)
        return 2
    loader = build_loader(
        cfg.data, cfg.data.train, ck.image_transform(True), ck.tokenize, train=True, seed=opts.seed
    )
    opt = build_optimizer(ck, cfg.model, cfg.optim)
    sched, loss_fn = build_scheduler(opt, cfg.optim, opts.total_steps), build_loss(cfg.loss)

    oc_step = OpenClipTrainStep(oc, lr, 0.1, opts.warmup, opts.total_steps)

    lines = [
        (
            f"{a} at {opts.image_size} px, context {opts.context}; {len(shards)} shards; seed {opts.seed}; "
            f"{torch.get_num_threads()} torch threads; load average at start: {_record.load_average()}"
        ),
        (
            "step | clipkit loss | open_clip_train loss | clipkit grad norm | open_clip_train grad norm "
            "| max |dW| image tower"
        ),
    ]
    print("\n".join(lines), flush=True)
    worst = 0.0
    for step, batch in enumerate(loader):
        if step == opts.steps:
            break
        inputs = split_inputs(batch)[0]
        ck.train()
        loss = loss_fn(ck(inputs), inputs)["loss"]
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        want, want_grad = oc_step(step, inputs["image"], inputs["text"])
        dw = max(
            (x - y).abs().max().item() for x, y in zip(ck.vision.model.parameters(), oc.visual.parameters())
        )
        worst = max(worst, abs(loss.item() - want.item()))
        lines.append(
            f"{step} | {loss.item():.6f} | {want.item():.6f} | {grad.item():.4f} | {want_grad.item():.4f} | {dw:.2e}"
        )
        print(lines[-1], flush=True)
    targets = _record.Targets()
    ok = worst <= TARGET
    lines.append(targets.check(f"largest loss difference over the steps <= {TARGET:g}", ok, f"{worst:.2e}"))
    lines.append(f"load average at end: {_record.load_average()}")
    report = "\n".join(
        [*_record.heading(f"Training step: clipkit against open_clip_train, same weights and batches ({a})",
                          "step_parity.py", argv),
         "```", *lines, "```", "", targets.summary(), ""]
    )  # fmt: skip
    print("\n" + report, flush=True)
    _record.save_report("step_parity", report, opts.record)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
