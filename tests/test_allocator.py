"""clipkit.allocator: freed blocks stay in the process for the next step, unless the user tuned
malloc (MALLOC_*) or asked for the defaults (CLIPKIT_MALLOC=default). Each case runs in a fresh
process: glibc's settings are per process and read MALLOC_* at start-up."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)

# Allocates, touches and frees 8 MiB, then does it again and prints the page faults of the second
# round: a block glibc gave back to the kernel is faulted in (and zeroed) again, 2,048 pages;
# a kept one is reused without a fault.
PROBE = """
import ctypes, resource
from clipkit import allocator
print(allocator.tune())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 8 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
f0 = faults(); p = libc.malloc(n); libc.memset(p, 1, n); f1 = faults(); libc.free(p)
print(f1 - f0)
"""


def probe(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CLIPKIT_MALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return out[0], int(out[1])


def test_tuned_malloc_reuses_a_freed_block_without_faulting_it_in_again():
    state, faults = probe()
    assert state.startswith("glibc, freed blocks kept for reuse")
    assert faults < 64  # 8 MiB is 2,048 pages


@pytest.mark.parametrize(
    "env, said",
    [
        ({"CLIPKIT_MALLOC": "default"}, "glibc defaults (CLIPKIT_MALLOC=default)"),
        ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "left as set in the environment (MALLOC_TRIM_THRESHOLD_)"),
    ],
)
def test_defaults_or_the_users_own_settings_are_left_alone(env, said):
    state, faults = probe(**env)
    assert state == said
    assert faults >= 2000  # glibc's defaults: the block went back to the kernel and faults in again
