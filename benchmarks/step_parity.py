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

    import open_clip
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
    oc = open_clip.create_model(a, force_image_size=opts.image_size, force_context_length=opts.context)
    weights = {"visual." + k: v for k, v in ck.vision.model.state_dict().items()}
    weights |= ck.text.model.state_dict()
    weights["logit_scale"] = ck.logit_scale.detach().clone()
    missing, unexpected = oc.load_state_dict(weights, strict=False)
    if missing or unexpected:
        print(f"the towers do not map onto open_clip's CLIP: missing {missing}, unexpected {unexpected}")
        return 2
    loader = build_loader(
        cfg.data, cfg.data.train, ck.image_transform(True), ck.tokenize, train=True, seed=opts.seed
    )
    opt = build_optimizer(ck, cfg.model, cfg.optim)
    sched, loss_fn = build_scheduler(opt, cfg.optim, opts.total_steps), build_loss(cfg.loss)

    def decays(name: str, q: torch.Tensor) -> bool:  # open_clip_train.main's rule
        return not (q.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)

    named = list(oc.named_parameters())
    oopt = torch.optim.AdamW(
        [
            {"params": [q for n, q in named if not decays(n, q)], "weight_decay": 0.0},
            {"params": [q for n, q in named if decays(n, q)], "weight_decay": 0.1},
        ],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    oloss = open_clip.ClipLoss()

    def oc_lr(step: int) -> float:  # open_clip_train.scheduler.cosine_lr
        if step < opts.warmup:
            return lr * (step + 1) / opts.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - opts.warmup) / (opts.total_steps - opts.warmup))) * lr

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
        oc.train()
        for group in oopt.param_groups:
            group["lr"] = oc_lr(step)
        image_f, text_f, scale = oc(inputs["image"], inputs["text"])
        want = oloss(image_f, text_f, scale)
        want.backward()
        want_grad = torch.nn.utils.clip_grad_norm_(oc.parameters(), 1.0)
        oopt.step()
        oopt.zero_grad(set_to_none=True)
        with torch.no_grad():
            oc.logit_scale.clamp_(0, math.log(100))
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
        [f"## Training step: clipkit against open_clip_train, same weights and batches ({a})", "", "```",
         _record.command_line("step_parity.py", argv), "```", "", "```", *lines, "```", "", targets.summary(), ""]
    )  # fmt: skip
    print("\n" + report, flush=True)
    _record.save_report("step_parity", report, opts.record)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
