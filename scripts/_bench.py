"""What every benchmark in scripts/ shares: the machine and code it ran on, alternating repeats, atomic JSON writes.

    from _bench import alternate_rounds, append_jsonl, environment, write_json   # scripts/ is on sys.path

A figure without its machine cannot be compared, so every benchmark's JSON carries :func:`environment` (CPU model
as ``lscpu`` names it, usable cores, Python/torch/... versions, the git commit). Benchmarks that compare two things
measure them in turn, round after round (:func:`alternate_rounds`), so a load that drifts during the run (a shared
machine) hits both sides alike. Results are written to a temporary file and renamed into place (:func:`write_json`,
:func:`append_jsonl`): an interrupted benchmark leaves the previous results, never a torn file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

from crackclf.utils import atomic_write_text, cpu_model, worker_count

REPO = Path(__file__).resolve().parents[1]
#: Distributions whose versions move the figures (read from their metadata: nothing heavy is imported).
PACKAGES = ("crackclf", "torch", "pytorch-lightning", "timm", "onnxruntime", "numpy", "pillow")
T = TypeVar("T")


def git_commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it; ``None`` outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if changed else commit


def environment() -> dict[str, Any]:
    """Where a benchmark ran: ``cpu`` (model name), ``cores`` (usable by this process), ``machine``, ``python``,
    ``versions`` of :data:`PACKAGES` (``None`` when not installed), ``git_commit`` and the load averages (1, 5 and
    15 minutes)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu_model(), "cores": worker_count(), "machine": platform.machine(),
            "python": platform.python_version(), "versions": versions, "git_commit": git_commit(),
            "load_average": list(os.getloadavg())}


def alternate_rounds(measurements: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Run every measurement once per round, in the given order, for ``rounds`` rounds: ``{name: [result, ...]}``.

    One after the other in each round (a, b, a, b, ...) rather than all of a then all of b, so that a slow spell
    of the machine hits both sides; report medians, and the ratio of each round to show the spread.
    """
    results: dict[str, list[T]] = {name: [] for name in measurements}
    for _ in range(rounds):
        for name, measure in measurements.items():
            results[name].append(measure())
    return results


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (temporary file beside ``path``, then rename; folders created)."""
    return atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def append_jsonl(path: Path, record: Any) -> Path:
    """Add ``record`` as one JSON line to ``path`` atomically: the file is rewritten whole and renamed into place,
    so an interrupted write never leaves half a line."""
    path = Path(path)
    before = path.read_text(encoding="utf-8") if path.exists() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    return atomic_write_text(path, before + json.dumps(record) + "\n")
