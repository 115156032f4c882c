"""A Ray cluster for one command: the one this process is connected to, a given one, or a local one.

    with ray_cluster(address) as ray:       # address: None, "auto", "10.0.0.5:6379", "ray://head:10001"
        refs = [task.remote(x) for x in xs]

Every node must see the same files at the same paths (inputs and ``--out``: a shared file
system) and have clipkit installed in the same Python environment as the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from clipkit.errors import ClipkitError

INSTALL_HINT = "pip install 'clipkit[ray]' (or pip install 'ray[data]>=2.9')"


def import_ray() -> Any:
    """The ``ray`` module, or a ClipkitError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClipkitError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str | None = None) -> Iterator[Any]:
    """Yield ``ray`` connected to a cluster: this process's connection when it has one (tests,
    notebooks), else ``address`` ("auto": the ``ray start`` cluster of this machine), else
    ``$RAY_ADDRESS``, else a new cluster of this machine's cores, started here and stopped on exit."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # "local": a new cluster even when `ray start` runs here (join that one with --address auto)
        kw = {"address": "local", "include_dashboard": False}
    else:
        kw = {"address": address}
    try:
        ray.init(logging_level=logging.WARNING, **kw)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ClipkitError(
            f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: {e}; "
            "start one with `ray start --head` and pass its address (or omit --address for a local one)"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_resource(ray: Any, name: str) -> float:
    """Total ``name`` ("CPU", "GPU") of the connected cluster (0 when it has none)."""
    return float(ray.cluster_resources().get(name, 0.0))
