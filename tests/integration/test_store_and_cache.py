"""The shared MLflow store and data cache under stress: two trainings started at the same moment on a new SQLite
store and one cache both finish (and the cache they built together is intact); a cache disk that fills up fails
the run cleanly, with its reason in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from crackclf.data.cache import cache_path
from crackclf.data.datamodule import CrackDataModule
from crackclf.data.images import load_resized
from tests.conftest import REPO, run_train

TRAIN = ("trainer=cpu", "trainer.max_epochs=2", "data.image_size=32", "data.batch_size=16", "data.progress=false",
         "callbacks.progress_bar.refresh_rate=0")


@pytest.mark.slow
def test_two_trainings_started_together_share_one_store_and_one_cache(tiny_dataset, tmp_path, mlflow_uri,
                                                                       cache_dir):
    # A new store (both processes create its tables) and an empty cache (both build the same files).
    processes = [
        subprocess.Popen([sys.executable, str(REPO / "train.py"), f"data.root={tiny_dataset}", *TRAIN,
                          f"hydra.run.dir={tmp_path / f'run{index}'}"], cwd=REPO, env=dict(os.environ),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert "database is locked" not in output and "Traceback" not in output
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert all("test/acc" in r.data.metrics for r in runs)

    # The cache both used: no temporary leftovers, one store of the images the scan decoded (no split caches
    # decoded again), and every split's images equal a fresh decode of its files.
    assert not [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(list(cache_dir.glob("inventory-*.images-32px-*.npy"))) == 1
    module = CrackDataModule(str(tiny_dataset), image_size=32, cache_dir=str(cache_dir), progress=False)
    module.setup()
    for split in ("train", "val", "test"):
        rows = module.rows_of(split)
        assert not cache_path(cache_dir, [(r.path, r.md5) for r in rows], 32).exists(), split
        expected = np.stack([load_resized(r.path, 32) for r in rows]).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(module._datasets[split].images.numpy(), expected)


@pytest.mark.slow
def test_a_full_cache_disk_fails_the_run_cleanly(tiny_dataset, tmp_path, mlflow_uri):
    disk = tmp_path / "tiny_disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); tests/unit/test_disk_full.py simulates the failure")
    try:
        # Inventory and split CSVs fit in 160 KiB; the 80 images at 32 px (240 KiB) do not: the scan goes on
        # without keeping them, and the image cache then fails.
        result = run_train(f"data.root={tiny_dataset}", *TRAIN, f"hydra.run.dir={tmp_path / 'run'}",
                           env={"CRACKCLF_CACHE": str(disk / "cache")})
        assert result.returncode == 2, result.stderr[-3000:]
        assert "crackclf: error: [Errno 28] no space left on the disk of" in result.stderr
        assert "Traceback" not in result.stderr
        # No partial image cache; the inventory (its CSV and the shifted-copy matcher's keys, each written whole,
        # atomically) fitted and stays for the next run.
        assert not [p for p in (disk / "cache").iterdir()
                    if p.suffix in (".npy", ".tmp") and not p.name.endswith(".shift.npy")]
        assert [p for p in (disk / "cache").iterdir() if p.name.endswith(".shift.npy")]
        client = MlflowClient(mlflow_uri)
        (run,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
        assert run.info.status == "FAILED" and "no space left" in run.data.tags["error"]
        traceback_file = client.download_artifacts(run.info.run_id, "error/traceback.txt", str(tmp_path))
        assert "DiskFullError" in Path(traceback_file).read_text()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
