"""The data stage as a user meets it: `crackclf data verify` on a damaged folder, training on the rest, and
`python train.py` with no data.root (download from a local server; offline message)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.archive_server import ArchiveServer, closed_port_url, zip_tree
from tests.conftest import run_cli, run_train, write_dataset

BAD_FILES = {
    "Negative/truncated.jpg": "cannot decode",
    "Positive/empty.jpg": "empty file (0 bytes)",
    "Positive/notes.jpg": "not a recognised image format",
}


@pytest.fixture
def damaged(tiny_dataset, tmp_path) -> Path:
    """A copy of the tiny data set plus a truncated JPEG, a zero-byte file and a text file named .jpg."""
    root = tmp_path / "damaged"
    shutil.copytree(tiny_dataset, root)
    whole = (tiny_dataset / "Negative" / "00000.jpg").read_bytes()
    (root / "Negative" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "Positive" / "empty.jpg").write_bytes(b"")
    (root / "Positive" / "notes.jpg").write_text("site visit notes: crack near column B4\n")
    return root


def test_verify_names_bad_files_and_training_runs_on_the_rest(damaged, tmp_path, mlflow_uri, cache_dir):
    result = run_cli("data", "verify", str(damaged), "--out", str(tmp_path / "report"), "--no-progress",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for path, reason in BAD_FILES.items():
        assert any(path in line and reason in line for line in result.stdout.splitlines()), (path, result.stdout)
    assert "Unreadable: 3" in result.stdout
    report = json.loads((tmp_path / "report" / "verify.json").read_text())
    assert {item["path"] for item in report["unreadable"]} == set(BAD_FILES)
    assert report["per_class"] == {"no_crack": {"files": 41, "readable": 40}, "crack": {"files": 42, "readable": 40}}
    assert (tmp_path / "report" / "verify.txt").read_text().strip() in result.stdout
    strict = run_cli("data", "verify", str(damaged), "--out", str(tmp_path / "report"), "--strict",
                     "--no-progress", cwd=tmp_path)
    assert strict.returncode == 1

    train = run_train(f"data.root={damaged}", "trainer=debug", "data.progress=false", "data.batch_size=16",
                      f"hydra.run.dir={tmp_path / 'run'}")
    assert train.returncode == 0, train.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    assert run.info.status == "FINISHED"
    logged = Path(client.download_artifacts(run.info.run_id, "data/verify.txt", str(tmp_path / "dl")))
    assert all(path in logged.read_text() for path in BAD_FILES)
    split_csv = next(cache_dir.glob("split-*.csv"))
    listed = split_csv.read_text()
    assert not any(path in listed for path in BAD_FILES) and listed.count("\n") == 1 + 80


@pytest.mark.slow  # ~15 s of interpreter start-up; the message itself is checked fast in tests/unit/test_download.py
def test_train_without_data_root_offline_names_data_root(tmp_path, mlflow_uri, cache_dir):
    with closed_port_url() as url:
        result = run_train("trainer=debug", f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}",
                           env={"CRACKCLF_DATA_URL": url})
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("crackclf: error:") and "data.root=" in message and "offline" in message
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_without_data_root_downloads_then_reuses(tmp_path, mlflow_uri, cache_dir):
    source = write_dataset(tmp_path / "published", per_class=30, seed=21)
    data_dir = tmp_path / "data"
    with ArchiveServer(zip_tree(source, prefix="Concrete Crack Images/")) as server:
        env = {"CRACKCLF_DATA_URL": server.url}
        first = run_train("trainer=debug", "data.progress=false", f"paths.data_dir={data_dir}",
                          f"hydra.run.dir={tmp_path / 'run1'}", env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert len(server.requests) == 1
        assert len(list((data_dir / "concrete_crack" / "Positive").glob("*.jpg"))) == 30
        second = run_cli("data", "download", "--dest", str(data_dir), cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        assert len(server.requests) == 1  # complete copy in place: nothing fetched again
        assert f"data.root={data_dir / 'concrete_crack'}" in second.stdout
