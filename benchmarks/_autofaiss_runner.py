"""Runs inside .venv-autofaiss (numpy 1, autofaiss 2.18): build one index with autofaiss's defaults.

    .venv-autofaiss/bin/python benchmarks/_autofaiss_runner.py EMB_DIR OUT_DIR --memory 512MB --threads 2

Reads every ``*.npy`` in EMB_DIR (the parts of a clipkit embedding export), lets autofaiss
choose the index for the memory budget (``max_index_memory_usage``), and writes
``OUT_DIR/knn.index``, ``OUT_DIR/infos.json`` (autofaiss's own report: index key, search
parameters) and ``OUT_DIR/runner.json`` (build seconds, this process's peak RSS from VmHWM).
Imports nothing from clipkit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("embeddings")
    p.add_argument("out")
    p.add_argument("--memory", default="512MB")
    p.add_argument("--available", default="4G", help="autofaiss current_memory_available")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from autofaiss import build_index

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _, infos = build_index(
        embeddings=args.embeddings,
        index_path=str(out / "knn.index"),
        index_infos_path=str(out / "infos.json"),
        file_format="npy",
        metric_type="ip",
        max_index_memory_usage=args.memory,
        current_memory_available=args.available,
        nb_cores=args.threads,
        verbose=20,
    )
    seconds = time.perf_counter() - t0
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    report = {"build_s": seconds, "peak_rss": peak, "infos": infos}
    (out / "runner.json").write_text(json.dumps(report, indent=1, default=str))
    print(
        json.dumps(
            {"build_s": seconds, "index_key": infos.get("index_key"), "index_param": infos.get("index_param")}
        )
    )


if __name__ == "__main__":
    main()
