"""How the model computes in training: ``torch.compile`` (``train.compile``) and gradient
checkpointing (``train.grad_checkpointing``).

Compilation is in place (``nn.Module.compile``): the model's ``__call__`` runs the compiled
graph, while its parameter names, ``state_dict`` and checkpoints stay those of the eager model,
and accelerate's autocast and DDP wrap it as they wrap any module. The first steps are slow
(tracing and code generation); a change of mode (``no_grad`` in gradient caching, eval) traces
once more.

Gradient checkpointing is switched on per tower (``Tower.set_grad_checkpointing``, which names a
tower that cannot do it); a tower without trainable parameters is left alone, since nothing
backpropagates through it.
"""

from __future__ import annotations

from torch import nn

from clipkit.config import TrainConfig
from clipkit.errors import ClipkitError


def compile_backends() -> list[str]:
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def compute_problems(t: TrainConfig) -> list[str]:
    """What is wrong with ``train.compile`` / ``train.compile_backend`` (empty: nothing)."""
    if not t.compile:
        return []
    known = compile_backends()
    if t.compile_backend not in known:
        return [
            f"train.compile_backend={t.compile_backend!r} is not a torch.compile backend; known: {', '.join(known)}"
        ]
    return []


def apply_grad_checkpointing(model: nn.Module) -> list[str]:
    """Checkpoint the blocks of each tower of ``model`` (a DualEncoder) that has trainable
    parameters; returns what was done, one phrase per tower, for the run plan."""
    done = []
    for name in ("vision", "text"):
        tower = getattr(model, name)
        if not any(p.requires_grad for p in tower.parameters()):
            done.append(f"{name} tower {tower.spec}: fully locked, nothing to checkpoint")
            continue
        try:
            tower.set_grad_checkpointing(True)
        except ValueError as err:  # the tower's own words, as a run error (no traceback in the CLI)
            raise ClipkitError(str(err)) from err
        done.append(f"{name} tower {tower.spec}: on")
    return done


def compile_model(model: nn.Module, backend: str) -> nn.Module:
    """``model`` compiled in place with ``backend``; returns it."""
    model.compile(backend=backend)
    return model
