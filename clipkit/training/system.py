"""What the run runs on, detected (never assumed), and what it costs: ``system.json``, throughput
and peak memory.

``system_info(acc, train_cfg)`` describes the machine: torch and CUDA versions, device, ranks and
the process-group backend accelerate chose (NCCL on CUDA, gloo on CPU), the GPU (name, compute
capability, bf16 support) or the CPU (torch's kernel level and the instruction-set flags from
``/proc/cpuinfo`` that make bf16 / fp16 native). It is printed in the run plan
(``system_lines``) and written to ``<run>/system.json`` (``write_system_json``, once per
session: a resumed run may run elsewhere, so the file holds the latest session's machine).

``rate_columns`` and ``peak_memory_columns`` are columns of each metrics row: samples per second
over all ranks and per rank, and the peak memory over ranks since the run started (GPU:
``torch.cuda.max_memory_allocated``, ``peak_mem_gib``; CPU: the process's peak resident set size
from ``getrusage``, ``peak_rss_gib``, which counts everything the process holds, not only
tensors).
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from clipkit import allocator
from clipkit.config import TrainConfig
from clipkit.data.atomic import atomic_write_text

# /proc/cpuinfo flags that make low-precision matmuls native on x86 (bf16: AVX512-BF16, AMX;
# fp16: AVX512-FP16, AMX-FP16). Without them, CPU autocast emulates the type (slower than fp32).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_FLAGS = ("avx512_fp16", "amx_fp16")
from clipkit.models.embed import cpu_flags

GIB = 2**30


def cpu_info(flags: set[str] | None = None) -> dict[str, Any]:
    """torch's CPU kernel level and whether bf16 / fp16 are native (from the flags)."""
    flags = cpu_flags() if flags is None else flags
    return {
        "model": platform.processor() or platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),  # "AVX512", "AVX2", "DEFAULT", ...
        "flags": sorted(f for f in (*BF16_FLAGS, *FP16_FLAGS) if f in flags),
        "bf16_native": any(f in flags for f in BF16_FLAGS),
        "fp16_native": any(f in flags for f in FP16_FLAGS),
    }


def gpu_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / GIB, 1),
        "bf16_supported": bool(torch.cuda.is_bf16_supported()),
        "count_visible": torch.cuda.device_count(),
    }


def system_info(acc: Accelerator, t: TrainConfig, checkpointed: list[str] | None = None) -> dict[str, Any]:
    """This rank's machine, device and settings (see the module docstring); ``checkpointed``:
    what gradient checkpointing did per tower (``clipkit.training.compute``)."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    info: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": str(acc.device),
        "processes": acc.num_processes,
        "backend": torch.distributed.get_backend() if dist else None,
        "torch_threads": torch.get_num_threads(),
        "precision": t.precision,
        "mixed_precision": acc.mixed_precision,
        "grad_scaler": type(acc.scaler).__name__ if acc.scaler is not None else None,
        "compile": t.compile_backend if t.compile else None,
        "grad_checkpointing": checkpointed or [],
        "cpu": cpu_info(),
        "allocator": allocator.state(),
    }
    if acc.device.type == "cuda":
        info["gpu"] = gpu_info(acc.device)
    return info


def system_lines(info: dict[str, Any]) -> list[str]:
    """The plan's lines on the machine and on what its precision means there."""
    cpu = info["cpu"]
    flags = ", ".join(cpu["flags"]) or "none"
    lines = [
        f"  system: torch {info['torch']}, {info['processes']} process(es)"
        + (f", process group {info['backend']}" if info["backend"] else "")
        + f"; CPU {cpu['capability']} kernels, low-precision flags: {flags}",
        f"  memory allocator: {info['allocator']}",
    ]
    gpu = info.get("gpu")
    if gpu:
        lines.append(
            f"  GPU {gpu['name']} (compute {gpu['capability']}, {gpu['memory_gib']} GiB, "
            f"bf16 {'yes' if gpu['bf16_supported'] else 'no'})"
        )
    precision, on_cpu = info["precision"], info["device"].startswith("cpu")
    if precision == "bf16" and on_cpu:
        lines.append(
            "  bf16 on this CPU: "
            + (
                "native (" + ", ".join(f for f in cpu["flags"] if "bf16" in f) + ")"
                if cpu["bf16_native"]
                else "emulated (no avx512_bf16 / amx_bf16): expect it slower than fp32"
            )
        )
    if precision == "fp16":
        scaler = f"gradient scaler {info['grad_scaler']}"
        if on_cpu and not cpu["fp16_native"]:
            scaler += "; fp16 on this CPU is emulated (no avx512_fp16 / amx_fp16): slow, meant for tests"
        lines.append(f"  fp16: {scaler}")
    if info["compile"]:
        lines.append(f"  torch.compile: backend {info['compile']} (the first steps trace and compile)")
    if info["grad_checkpointing"]:
        lines.append("  gradient checkpointing: " + "; ".join(info["grad_checkpointing"]))
    return lines


def write_system_json(run_dir: Path, info: dict[str, Any]) -> Path:
    path = Path(run_dir) / "system.json"
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------- metrics columns


def rate_columns(samples: int, seconds: float, world: int) -> dict[str, float]:
    """``samples`` (all ranks) trained in ``seconds``: rate in total and per rank."""
    total = samples / max(seconds, 1e-9)
    return {"samples_per_s": total, "samples_per_s_rank": total / max(world, 1)}


def peak_memory_gib(device: torch.device) -> tuple[str, float]:
    """(column name, this process's peak memory in GiB since it started)."""
    if device.type == "cuda":
        return "peak_mem_gib", torch.cuda.max_memory_allocated(device) / GIB
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "peak_rss_gib", rss / (GIB if sys.platform == "darwin" else 2**20)


def peak_memory_columns(acc: Accelerator) -> dict[str, float]:
    """``{name: GiB}``: the largest peak over ranks (a collective with several ranks)."""
    name, gib = peak_memory_gib(acc.device)
    if acc.num_processes > 1:
        gib = float(acc.gather(torch.tensor([gib], device=acc.device)).max())
    return {name: gib}
