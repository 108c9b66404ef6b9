"""scripts/_bench.py, what every benchmark shares: the machine it ran on, alternating rounds, atomic JSON writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from crackclf.utils import cpu_model, worker_count
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import _bench  # noqa: E402  (scripts/ is on sys.path when a benchmark runs, as here)


def test_rounds_alternate_the_measurements_in_order():
    calls: list[str] = []
    results = _bench.alternate_rounds({"ours": lambda: calls.append("ours") or len(calls),
                                       "theirs": lambda: calls.append("theirs") or len(calls)}, 3)
    assert calls == ["ours", "theirs"] * 3
    assert results == {"ours": [1, 3, 5], "theirs": [2, 4, 6]}


def test_environment_names_the_machine_and_the_code():
    env = _bench.environment()
    assert env["cpu"] == cpu_model() and env["cores"] == worker_count() and len(env["load_average"]) == 3
    assert env["versions"]["torch"] and env["versions"]["crackclf"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert env["git_commit"].split("+")[0] == head.stdout.strip()
    json.dumps(env)  # goes into every benchmark's JSON as is


def test_results_are_written_whole_and_lines_appended(tmp_path):
    out = tmp_path / "bench" / "result.json"
    _bench.write_json(out, {"rate": 1.5})
    _bench.write_json(out, {"rate": 2.5})
    assert json.loads(out.read_text()) == {"rate": 2.5}
    lines = tmp_path / "runs.jsonl"
    lines.write_text('{"run": 1}')  # a file whose last line has no newline yet
    _bench.append_jsonl(lines, {"run": 2})
    assert [json.loads(line) for line in lines.read_text().splitlines()] == [{"run": 1}, {"run": 2}]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bench", "result.json", "runs.jsonl"]  # no temp files
