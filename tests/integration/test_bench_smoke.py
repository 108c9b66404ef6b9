"""The benchmarks behind the README's figures, run as a user runs them on a small generated set: each finishes,
writes its record, and the record says what was measured (the counts it was given, figures read back from where
they were made). The figures themselves are measurements, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, subprocess_env
from tests.served_model import write_model


def bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), *map(str, args)], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def test_bench_recipe_reports_the_run_it_trained(tiny_dataset, tmp_path):
    """``make bench-recipe``: a cold-start run of the recipe (here cut to 2 epochs of a small backbone); the record
    is the kept run's MLflow figures."""
    out = tmp_path / "recipe.jsonl"
    result = bench("bench_recipe.py", "--data", tiny_dataset, "--runs", "1", "--out", out, "--keep", tmp_path / "keep",
                   "backbone=lcnet_050", "backbone.pretrained=false", "data.image_size=32", "trainer.max_epochs=2",
                   "callbacks.time_budget.minutes=null")
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    (work,) = (tmp_path / "keep").iterdir()
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(record["run_id"])
    assert record["test_acc"] == run.data.metrics["test/acc"] and record["epochs"] == 2
    assert record["overrides"][0] == "backbone=lcnet_050" and record["cold_cache"] is True
    assert run.data.params["backbone.name"] == "lcnet_050" and run.data.params["trainer.devices"] == "2"  # cpu_fast
    assert record["cpu"] and f"| 1 | {record['wall_s']} | 2 |" in result.stdout
    # The kept run: its checkpoints and MLflow store, not its data cache (rebuilt in a minute, ~0.9 GB a full run).
    assert (work / "run" / "checkpoints" / "best.ckpt").is_file() and not (work / "cache").exists()


def test_bench_infer_times_both_backends_on_the_files_given(tiny_dataset, tmp_path):
    """``make bench-infer``: eager PyTorch and ONNX Runtime at each batch size, then end to end on ``--images``."""
    out = tmp_path / "infer.json"
    bench("bench_infer.py", "--data", tiny_dataset, "--images", "16",  # no --model: the untrained default backbone
          "--seconds", "0.1", "--repeats", "1", "--batches", "1", "4", "--out", out)
    record = json.loads(out.read_text())
    assert record["files"] == 16 and record["backbone"] == "tf_efficientnet_lite0" and record["image_size"] == 96
    for key in ("eager_batch1", "onnxruntime_batch1", "eager_batch4", "onnxruntime_batch4", "predict_torch",
                "predict_onnx", "bare_decode_resize"):
        assert record[key] > 0, key


def test_bench_serve_sends_every_request_and_reports_latency(tiny_dataset, tmp_path):
    """``make bench-serve``: a real ``crackclf serve`` under concurrent POST /predict; every request answered."""
    out = tmp_path / "serve.json"
    bench("bench_serve.py", "--model", write_model(tmp_path), "--data", tiny_dataset, "--requests", "24",
          "--warmup", "2", "--images", "8", "--concurrency", "2", "--timeout", "240", "--out", out)
    record = json.loads(out.read_text())
    assert record["requests"] == record["requested"] == 24 and record["errors"] == 0, record
    assert 0 < record["latency_ms"]["p50"] <= record["latency_ms"]["p99"] <= record["latency_ms"]["max"]


def test_bench_data_measures_the_pipeline_of_the_folder_given(tiny_dataset, tmp_path):
    """``make bench-data``: the decode-once cache against the ImageFolder baseline, loader alone and training."""
    out = tmp_path / "data.json"
    bench("bench_data.py", "--data", tiny_dataset, "--cache-dir", tmp_path / "cache", "--loader-batches", "2",
          "--train-steps", "1", "--warmup", "0", "--repeats", "1", "--workers", "0", "--out", out,
          "backbone=lcnet_050", "backbone.pretrained=false", "data.image_size=32", "data.batch_size=8")
    record = json.loads(out.read_text())
    assert record["images_in_data"] == 80 and record["backbone"] == "lcnet_050" and record["image_size"] == 32
    assert (tmp_path / "cache").is_dir()


@pytest.mark.parametrize("script", ["bench_data.py", "bench_recipe.py"])
def test_benchmarks_refuse_a_missing_data_folder_by_name(script, tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--data", str(missing), "--out",
                             str(tmp_path / "x.json")], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and str(missing) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # three pretrained networks built and fine-tuned for a few steps
def test_norm_stats_study_prints_both_tables_from_the_images_given(tiny_dataset):
    """``scripts/norm_stats_study.py`` (the BatchNorm diagnosis of docs/transfer.md) on a small generated set: the
    probe's scores in both modes, then one fine-tune per learning rate and BatchNorm setting."""
    result = bench("norm_stats_study.py", "--data", tiny_dataset, "--images", 80, "--steps", 2, "--lrs", 0.002)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    probe = [row for row in rows if row.startswith("| 48 images |")]
    assert len(probe) == 1
    scores = [float(v) for part in probe[0].split("|")[2:4] for v in part.split("/")]
    assert len(scores) == 4 and all(0.0 <= v <= 1.0 for v in scores)
    tuned = [row for row in rows if row.startswith("| 0.002 |")]
    assert [row.split("|")[2].strip() for row in tuned] == ["false", "true"]
    assert all(0.0 <= float(row.split("|")[5]) <= 1.0 for row in tuned)
