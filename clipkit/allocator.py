"""glibc ``malloc`` settings that keep a training or evaluation step's tensors off the kernel.

A CPU step allocates and frees the same large tensors (activations, gradients) every time.
glibc serves each block over its mmap threshold (dynamic, 128 KiB to start) with a fresh
``mmap`` and gives it back with ``munmap`` on free, and it returns the top of the heap to the
kernel once more than 128 KiB of it is free. Every step then faults in and zeroes its pages
again. Measured on a 2-core AVX2 EPYC (three alternating pairs of processes, 16 ViT-S-32-alt
steps each): 782,000-1,191,000 page faults and 2.8-4.1 s of system time per 16 steps with glibc's
defaults; 23,000-60,000 faults and 0.7-0.8 s with the settings below; median step 1,507-1,784 ->
1,315-1,470 ms. On a 2-core AVX-512 EPYC whose kernel faults far less to begin with (20,500 faults
a ViT-S step with the defaults, 7,200 with these), the step times of the two overlapped within that
machine's drift (defaults 1,287-1,528 ms, these 1,425-1,612 ms; tiny ViT 68-91 against 79-85 ms).
``benchmarks/step_levers.py`` reruns the comparison (``CLIPKIT_MALLOC=default`` against these,
alternating processes, with page faults and system time); benchmarks/RESULTS.md keeps both runs.

``tune()`` sets, through ``mallopt``:
- ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's upper limit on 64-bit): blocks up to that size come
  from the heap and are reused after a free;
- ``M_TRIM_THRESHOLD`` = 2 GiB - 1: freed memory stays in the process for the next step;
- ``M_TOP_PAD`` = 64 MiB: the heap grows in larger steps (fewer ``brk`` calls).
The cost is memory: what a step freed stays mapped (counted in RSS) until it is reused, so the
resident size sits near the step's peak instead of dipping between steps. Nothing changes in the
computation.

It does nothing, and says why (``state()``), when the C library is not glibc, when any
``MALLOC_*`` variable is set (the user's own tuning wins; glibc read it at start-up), or when
``CLIPKIT_MALLOC=default``. Processes forked later (data-loader workers) inherit the settings.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # malloc.h
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 << 20))

_state: str | None = None


def tune() -> str:
    """Apply the settings once per process; returns ``state()``."""
    global _state
    if _state is not None:
        return _state
    own = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if os.environ.get("CLIPKIT_MALLOC", "").lower() == "default":
        _state = "glibc defaults (CLIPKIT_MALLOC=default)"
    elif own:
        _state = f"left as set in the environment ({', '.join(own)})"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = f"system default ({platform.system()}, {platform.libc_ver()[0] or 'no glibc'})"
    else:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            ok = all(mallopt(param, value) == 1 for param, value in SETTINGS)
        except (OSError, AttributeError) as err:
            ok, why = False, str(err)
        else:
            why = "mallopt refused a setting"
        _state = (
            "glibc, freed blocks kept for reuse (mmap threshold 32 MiB, trim threshold 2 GiB)"
            if ok
            else f"glibc defaults ({why})"
        )
    return _state


def state() -> str:
    """What ``tune()`` did in this process, or that it has not run."""
    return _state or "glibc defaults (clipkit.allocator.tune not called)"
