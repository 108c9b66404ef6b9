"""scripts/bench_coldstart.py as a user runs it: every phase of a cold start timed, for the files that are there."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_cold_start_benchmark_times_every_phase(tiny_dataset, tmp_path):
    out = tmp_path / "coldstart.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_coldstart.py"), "--data",
                             str(tiny_dataset), "--image-size", "32", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images"] == 80  # the 40 + 40 generated files
    phases = report["seconds"]
    assert len(phases) == 5 and "image caches at 32 px (gathered from the scan's pixels)" in phases
    assert all(seconds >= 0 for seconds in phases.values())
    assert "| **total** |" in result.stdout and report["cpu"] in result.stdout
