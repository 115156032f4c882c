"""``train.log_sample_ids``: which samples each optimizer step trained on, crash-safe.

One file per rank in the run folder (``sample_ids.log`` on rank 0, ``sample_ids.rank<r>.log``
on the others), one line per optimizer step, appended with a single ``write`` and flushed to
the kernel at once, so a killed run loses at most the line being written:

    <step> <epoch>:<idx>,<idx>,...[;<epoch>:<idx>,...] $    one ``;`` part per micro-batch
    # resume step=<s>                                       a resumed run replays steps > s

Steps after the checkpoint a run resumed from are logged again; ``read_sample_log`` keeps the
last complete line (ending in `` $``) of every step (with exact resume the lines of a replayed step are equal).
"""

from __future__ import annotations

import os
from pathlib import Path


def sample_log_path(run_dir: str | Path, rank: int = 0) -> Path:
    return Path(run_dir) / ("sample_ids.log" if rank == 0 else f"sample_ids.rank{rank}.log")


class SampleLog:
    """Append-only writer of one rank's sample log; ``resumed_step`` marks a resume."""

    def __init__(self, run_dir: str | Path, rank: int = 0, resumed_step: int | None = None):
        self.path = sample_log_path(run_dir, rank)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._torn():  # a run killed mid-write (disk full) left a line without its newline
            self._write("\n")
        if resumed_step is not None:
            self._write(f"# resume step={resumed_step}\n")

    def _write(self, line: str) -> None:
        os.write(self.fd, line.encode())  # O_APPEND: one write, one line, even after a torn one

    def write(self, step: int, parts: list[tuple[int, list[int]]]) -> None:
        """``parts``: (epoch, idx list) per micro-batch of the step."""
        body = ";".join(f"{epoch}:{','.join(str(i) for i in idx)}" for epoch, idx in parts)
        self._write(f"{step} {body} $\n")

    def _torn(self) -> bool:
        size = os.fstat(self.fd).st_size
        if size == 0:
            return False
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) != b"\n"

    def close(self) -> None:
        os.close(self.fd)


def read_sample_log(path: str | Path) -> dict[int, list[tuple[int, list[int]]]]:
    """{step: [(epoch, idx list) per micro-batch]} from a sample log; the last line of a step wins.

    Lines without the final `` $`` (torn by a kill or a full disk) are ignored.
    """
    out: dict[int, list[tuple[int, list[int]]]] = {}
    for line in Path(path).read_text().split("\n"):
        if not line.endswith(" $"):
            continue
        try:
            step_text, body = line[:-2].split(" ", 1)
            parts = []
            for part in body.split(";"):
                epoch, idx = part.split(":", 1)
                parts.append((int(epoch), [int(i) for i in idx.split(",") if i]))
            out[int(step_text)] = parts
        except ValueError:
            continue
    return out


def last_step_since_resume(path: str | Path) -> int:
    """Highest step logged after the last resume mark: the running process's progress (0: none)."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().split("\n")
    marks = [i for i, line in enumerate(lines) if line.startswith("#")]
    tail = lines[marks[-1] + 1 :] if marks else lines
    return max((int(line.split(" ", 1)[0]) for line in tail if line.endswith(" $")), default=0)
