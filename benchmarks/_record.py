"""What every benchmark shares: where its output may go, and its verdict on each target.

A benchmark prints its report and saves a copy under ``runs/bench/<name>/`` (git-ignored). It
writes into a file of the repository (``benchmarks/RESULTS.md``, ``benchmarks/objectives.md``,
anything git does not ignore) only when run with ``--record``: ``write_text`` / ``append_text``
refuse such a path otherwise. Each target a benchmark prints is a ``Targets.check``; the exit
status is 1 when any is missed, so a run that misses its bar fails in CI and in ``make bench``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
RUNS = ROOT / "runs" / "bench"  # git-ignored (runs/): every benchmark's default output


class TrackedFileError(RuntimeError):
    """A benchmark was about to write into the repository without ``--record``."""


# --------------------------------------------------------------------------- where output goes


def add_record_flag(
    p: argparse.ArgumentParser, what: str = f"append the report to {RESULTS_MD.name}"
) -> None:
    p.add_argument(
        "--record",
        action="store_true",
        help=f"{what} (a tracked file); without --record the report goes to stdout and {RUNS.relative_to(ROOT)}/",
    )


def in_repository(path: str | Path) -> bool:
    """True when ``path`` lies in this checkout and git does not ignore it: a tracked file, or one a
    commit would pick up. Outside the checkout, or git-ignored (``runs/``, ``data/``): False."""
    path = Path(os.path.abspath(path))
    try:
        path.relative_to(ROOT)
    except ValueError:
        return False
    try:  # exit 0: ignored; 1: not ignored (tracked files never count as ignored); 128: no git
        code = subprocess.run(
            ["git", "-C", str(ROOT), "check-ignore", "-q", "--", str(path)], capture_output=True, check=False
        ).returncode
    except FileNotFoundError:
        code = 128
    if code in (0, 1):
        return code == 1
    return not path.is_relative_to(ROOT / "runs")  # no git: only runs/ counts as scratch space


def guard(path: str | Path, record: bool) -> Path:
    """``path``, after checking that a benchmark may write there (see the module docstring)."""
    path = Path(path)
    if not record and in_repository(path):
        raise TrackedFileError(
            f"{path} is part of the repository (not git-ignored): a benchmark writes there only with "
            f"--record; without it, give an output path under {RUNS.relative_to(ROOT)}/ or outside the checkout"
        )
    return path


def output_dir(path: str | Path, record: bool = False) -> Path:
    """Create and return a benchmark's working folder (shards, run folders, caches), guarded."""
    path = guard(path, record)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text(path: str | Path, text: str, record: bool = False) -> Path:
    """Replace ``path`` atomically (temporary file + os.replace); guarded."""
    path = guard(path, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def append_text(path: str | Path, text: str, record: bool = False) -> Path:
    """Append ``text`` to ``path`` (rewritten atomically, so a crash leaves the old file); guarded."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    return write_text(path, old + text, record)


def save_report(name: str, text: str, record: bool, results: Path = RESULTS_MD) -> list[Path]:
    """Keep ``text`` as ``runs/bench/<name>/<time>.md``; with ``record`` also append it to ``results``.

    Returns the files written (printed too, so the log says where the report went)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    written = [write_text(RUNS / name / f"{stamp}.md", text)]
    if record:
        written.append(append_text(results, "\n" + text.rstrip("\n") + "\n", record=True))
    for path in written:
        print(f"report written to {path}", flush=True)
    return written


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces this run, as recorded with its figures."""
    return shlex.join([".venv/bin/python", f"benchmarks/{script}", *argv])


def heading(title: str, script: str, argv: list[str] | None) -> list[str]:
    """The first lines of a recorded section: ``## title``, then the command in a code block
    (``argv`` None: this process's own arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [f"## {title}", "", "```", command_line(script, args), "```", ""]


def heading_text(title: str, script: str, argv: list[str] | None) -> str:
    """``heading`` as one string, ending in a blank line: the text that follows is the section's."""
    return "\n".join(heading(title, script, argv)) + "\n"


def load_average() -> str:
    """``os.getloadavg()`` as "1 min, 5 min, 15 min"; a benchmark prints it at its start and end."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unavailable"


# --------------------------------------------------------------------------- verdicts


MET, MISSED, NOT_MEASURED = "met", "NOT met", "not measured in the same run"


@dataclass
class Verdict:
    what: str  # the target, in the words the report prints ("clipkit wall <= 0.8x CLIP_benchmark's")
    status: str  # MET, MISSED or NOT_MEASURED (which does not count as met)
    detail: str = ""

    def line(self) -> str:
        return f"target {self.what}: {self.status}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Targets:
    """The verdicts a benchmark prints; ``exit_code`` is 1 when any target is not met."""

    verdicts: list[Verdict] = field(default_factory=list)

    def check(self, what: str, ok: bool, detail: str = "") -> str:
        """Record one target and return its printed line."""
        self.verdicts.append(Verdict(what, MET if ok else MISSED, detail))
        return self.verdicts[-1].line()

    def not_measured(self, what: str, detail: str = "") -> str:
        """A target whose figure was not measured in this run: reported, and never counted as met."""
        self.verdicts.append(Verdict(what, NOT_MEASURED, detail))
        return self.verdicts[-1].line()

    @property
    def missed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status != MET]

    def summary(self) -> str:
        if not self.verdicts:
            return "no targets checked"
        if not self.missed:
            return f"all {len(self.verdicts)} targets met"
        return f"{len(self.missed)} of {len(self.verdicts)} targets missed: " + "; ".join(
            v.what for v in self.missed
        )

    def exit_code(self) -> int:
        return 1 if self.missed else 0
