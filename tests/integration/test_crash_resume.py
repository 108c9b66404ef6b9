"""Crash-safe training as a user meets it: `python train.py` killed (SIGKILL at a random step, SIGTERM, Ctrl-C) or
failing, then `resume=auto` — checked through MLflow (same run, each epoch logged exactly once, same step history as
an uninterrupted run), the checkpoints on disk and the final test accuracy."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, default_signals, run_train, write_dataset

# Small and quick: 32 px, 3 batches per epoch, no early stop (every run trains the same number of epochs).
# mobilenetv3_small_100: the backbone these runs were written for (the default until stop 19). A resumed run is
# compared with an uninterrupted one value for value (validation losses): until stop 24 resumes were not exact (the
# noise augmentation kept a bank of random values outside the checkpoint, and a stop mid-batch saved the random
# state after that batch's draws), which showed as seed 15 ending far from its uninterrupted run.
TRAIN = ("trainer=cpu", "backbone=mobilenetv3_small_100", "data.image_size=32", "data.batch_size=16",
         "data.progress=false",
         "callbacks.progress_bar.refresh_rate=0", "callbacks.early_stopping.patience=100")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("resume_data"), per_class=40, size=48, seed=4)


def start(data: Path, run_dir: Path, env: dict, *overrides: str) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed by the process's end
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), f"data.root={data}", *TRAIN, *overrides,
                             f"hydra.run.dir={run_dir}"], cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=default_signals)


class SaveWatcher:
    """Counts the (re)writes of a checkpoint file by a running training."""

    def __init__(self, process: subprocess.Popen, checkpoint: Path) -> None:
        self.process, self.checkpoint = process, checkpoint
        self.times: list[float] = []
        self._last: int | None = None

    def wait(self, count: int, timeout: float = 300) -> list[float]:
        """Wait until ``count`` writes have been seen; returns when each was seen (monotonic seconds)."""
        deadline = time.monotonic() + timeout
        while len(self.times) < count:
            assert self.process.poll() is None, f"training ended ({self.process.returncode}) before {count} saves"
            assert time.monotonic() < deadline, "no checkpoint in time"
            if self.checkpoint.exists() and self.checkpoint.stat().st_mtime_ns != self._last:
                self._last = self.checkpoint.stat().st_mtime_ns
                self.times.append(time.monotonic())
            time.sleep(0.02)
        return self.times


def the_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    return client, runs[0]


def value_history(client: MlflowClient, run, key: str) -> list[float]:
    """A metric's values in step order."""
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def step_history(client: MlflowClient, run) -> dict[str, list[int]]:
    """Every metric's logged steps (duplicates kept), the shape of a run's history."""
    return {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}


def check_resumed(uri: str, run_dir: Path, epochs: int, log: str, data: Path) -> tuple[MlflowClient, object]:
    """The resumed run: one FINISHED MLflow run, each epoch logged once, checkpoints that load."""
    assert "resume=auto: continuing" in log, log[-3000:]
    client, run = the_run(uri)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed_from")
    history = step_history(client, run)
    for key in ("train/loss", "train/acc", "lr-AdamW"):  # logged once per epoch, never twice, never skipped
        assert len(history[key]) == epochs and history[key] == sorted(set(history[key])), (key, history[key])
    epochs_logged = [m.value for m in client.get_metric_history(run.info.run_id, "epoch")
                     if m.step in set(history["train/loss"])]
    assert sorted(set(epochs_logged)) == [float(e) for e in range(epochs)]

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == epochs and last["global_step"] == history["train/loss"][-1] + 1
    from crackclf.inference.predictor import Predictor

    predictor = Predictor.load(run_dir / "checkpoints" / "best.ckpt")  # the deployed bundle loads and predicts
    assert predictor.predict_one(next((data / "Positive").glob("*.jpg"))).ok
    return client, run


def kill_and_resume(data: Path, tmp_path: Path, seed: int, epochs: int, rng: random.Random) -> tuple[str, str]:
    """Train, SIGKILL at a random step of epochs 2..N-2 (of epoch 1 when N = 3), resume with resume=auto;
    returns (MLflow URI, resume log)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "CRACKCLF_CACHE": str(tmp_path / "cache")}
    first = tmp_path / "runs" / "first"
    first.parent.mkdir(parents=True)
    process = start(data, first, env, f"seed={seed}", f"trainer.max_epochs={epochs}")
    try:
        watcher = SaveWatcher(process, first / "checkpoints" / "last.ckpt")
        if epochs <= 3:  # quick variant: somewhere in the first half second of epoch 1
            watcher.wait(1)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            times = watcher.wait(2)  # saved at the start of epochs 1 and 2
            epoch_seconds = times[1] - times[0]
            watcher.wait(rng.randint(2, epochs - 2))  # kill somewhere in that epoch, at a random batch
            time.sleep(rng.uniform(0.0, 0.9) * epoch_seconds)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()
    saved = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    print(f"seed {seed}: SIGKILL during epoch {saved['epoch']}, last checkpoint at step {saved['global_step']}")
    resumed = run_train(f"data.root={data}", *TRAIN, f"seed={seed}", f"trainer.max_epochs={epochs}", "resume=auto",
                        f"hydra.run.dir={tmp_path / 'runs' / 'second'}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return uri, resumed.stdout + resumed.stderr


def test_sigkill_then_resume_auto_continues_the_same_run(data, tmp_path):
    """Fast variant: one seed, 3 epochs, killed early in epoch 1."""
    uri, log = kill_and_resume(data, tmp_path, seed=3, epochs=3, rng=random.Random(3))
    check_resumed(uri, tmp_path / "runs" / "first", 3, log, data)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
def test_sigkill_at_a_random_step_resumes_like_an_uninterrupted_run(data, tmp_path, seed):
    epochs = 6
    uri, log = kill_and_resume(data, tmp_path / "killed", seed, epochs, random.Random(seed))
    client, run = check_resumed(uri, tmp_path / "killed" / "runs" / "first", epochs, log, data)

    baseline_uri = f"sqlite:///{tmp_path / 'baseline.db'}"
    baseline = run_train(f"data.root={data}", *TRAIN, f"seed={seed}", f"trainer.max_epochs={epochs}",
                         f"hydra.run.dir={tmp_path / 'baseline'}",
                         env={"MLFLOW_TRACKING_URI": baseline_uri, "CRACKCLF_CACHE": str(tmp_path / "cache")})
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    baseline_client, baseline_run = the_run(baseline_uri)
    # The same history, step for step, as if nothing had happened ...
    assert step_history(client, run) == step_history(baseline_client, baseline_run)
    # ... and the same training: every epoch's validation loss, and the test accuracy.
    assert value_history(client, run, "val/loss") == pytest.approx(
        value_history(baseline_client, baseline_run, "val/loss"), abs=1e-4)
    resumed_acc, baseline_acc = run.data.metrics["test/acc"], baseline_run.data.metrics["test/acc"]
    print(f"seed {seed}: test/acc resumed {resumed_acc:.4f}, uninterrupted {baseline_acc:.4f}")
    assert resumed_acc == pytest.approx(baseline_acc, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_save_a_checkpoint_mark_killed_and_resume(data, tmp_path, stop):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "CRACKCLF_CACHE": str(tmp_path / "cache")}
    first = tmp_path / "runs" / "first"
    first.parent.mkdir(parents=True)
    process = start(data, first, env, "trainer.max_epochs=4")
    try:
        SaveWatcher(process, first / "checkpoints" / "last.ckpt").wait(1)
        time.sleep(0.3)
        saved_before = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
        process.send_signal(stop)
        code = process.wait(timeout=120)
    finally:
        process.kill()
    log = (tmp_path / "runs" / "first.log").read_text()
    assert code == (128 + signal.SIGTERM if stop == signal.SIGTERM else 1), log[-3000:]
    assert "checkpoint saved to" in log and "Traceback" not in log, log[-3000:]
    client, run = the_run(uri)
    assert run.info.status == "KILLED"
    stopped = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)
    assert stopped["global_step"] >= saved_before > 0

    resumed = run_train(f"data.root={data}", *TRAIN, "trainer.max_epochs=4", "resume=auto",
                        f"hydra.run.dir={tmp_path / 'runs' / 'second'}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_resumed(uri, first, 4, resumed.stdout + resumed.stderr, data)


INTERRUPT = "+callbacks.interrupt._target_=tests.interrupt.InterruptAt"


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict[str, list[tuple[int, float]]]:
    """The history (step, value) of val/loss of the same 4-epoch run, never stopped."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = run_train(f"data.root={data}", *TRAIN, "trainer.max_epochs=4", INTERRUPT,
                       f"hydra.run.dir={folder / 'run'}",
                       env={"MLFLOW_TRACKING_URI": uri, "CRACKCLF_CACHE": str(folder / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = the_run(uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in ("val/loss",)}


@pytest.mark.slow
@pytest.mark.parametrize("point", ["train:1:1", "validation:1:0", "train:2:0"],
                         ids=["mid-epoch", "in-the-epoch's-validation", "first-batch"])
def test_ctrl_c_at_an_exact_point_resumes_with_every_epoch_logged_once(data, tmp_path, point, uninterrupted):
    """Ctrl-C at a chosen batch (no timing luck): in the middle of an epoch's training, and during its validation
    pass, after the epoch's last training batch (where a resumed run trains no batch of that epoch)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "CRACKCLF_CACHE": str(tmp_path / "cache")}
    first = run_train(f"data.root={data}", *TRAIN, "trainer.max_epochs=4", INTERRUPT,
                      f"hydra.run.dir={tmp_path / 'runs' / 'first'}", env={**env, "CRACKCLF_TEST_INTERRUPT": point})
    assert first.returncode == 1 and "checkpoint saved to" in first.stdout + first.stderr, first.stderr[-3000:]
    client, run = the_run(uri)
    assert run.info.status == "KILLED"
    stopped = torch.load(tmp_path / "runs" / "first" / "checkpoints" / "last.ckpt", weights_only=False)
    stage, epoch, batch = point.split(":")
    assert stopped["epoch"] == int(epoch)
    batches = 3  # 2 x 40 images at batch 16, less the validation and test shares: see the data fixture
    assert stopped["global_step"] == int(epoch) * batches + (int(batch) if stage == "train" else batches)

    resumed = run_train(f"data.root={data}", *TRAIN, "trainer.max_epochs=4", INTERRUPT, "resume=auto",
                        f"hydra.run.dir={tmp_path / 'runs' / 'second'}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, run = check_resumed(uri, tmp_path / "runs" / "first", 4, resumed.stdout + resumed.stderr, data)
    # Each epoch at the step of its last batch, as an uninterrupted run logs it; every epoch validated (a stop in
    # the validation pass runs it again), and the resumed run's validation losses are the uninterrupted run's.
    assert step_history(client, run)["train/loss"] == [batches * (e + 1) - 1 for e in range(4)]
    assert step_history(client, run)["val/loss"] == [step for step, _ in uninterrupted["val/loss"]]
    assert value_history(client, run, "val/loss") == pytest.approx([v for _, v in uninterrupted["val/loss"]], abs=1e-4)


@pytest.mark.slow
def test_an_exception_marks_the_run_failed_with_its_traceback(data, tmp_path, mlflow_uri, cache_dir):
    # Valid for the config checks, refused by torch inside fit: an error the run cannot anticipate.
    result = run_train(f"data.root={data}", *TRAIN, "trainer.max_epochs=2", "+optimizer.betas=[2.0,0.9]",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1
    client, run = the_run(mlflow_uri)
    assert run.info.status == "FAILED" and "Invalid beta parameter" in run.data.tags["error"]
    traceback_file = client.download_artifacts(run.info.run_id, "error/traceback.txt", str(tmp_path))
    text = Path(traceback_file).read_text()
    assert text.startswith("Traceback") and "ValueError: Invalid beta parameter" in text
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # no checkpoint of a failing state
    assert '"status": "FAILED"' in (tmp_path / "run" / "resume.json").read_text()


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_both_ddp_ranks_with_a_checkpoint(data, tmp_path):
    """Ctrl-C in a terminal reaches every process of the command (rank zero, the rank it started with the run, their
    workers): both ranks stop together, rank zero saves its checkpoint and marks the run KILLED, nothing is left
    running, and the observer that ends a run whose rank failed does not kill rank zero for it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tmp_path / "runs" / "first"
    first.parent.mkdir(parents=True)
    log_path = first.parent / "first.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), f"data.root={data}", "trainer=ddp", "trainer.accelerator=cpu",
             "trainer.devices=2", *TRAIN[1:], "trainer.max_epochs=40", f"hydra.run.dir={first}"],
            cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": uri, "CRACKCLF_CACHE": str(tmp_path / "cache"),
                           "PYTHONUNBUFFERED": "1"},
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=default_signals, start_new_session=True)
    try:
        SaveWatcher(process, first / "checkpoints" / "last.ckpt").wait(1)
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does: the whole foreground process group
        code = process.wait(timeout=120)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # rank one and any worker end too
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("processes of the run were still running 30 s after rank zero ended")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "started 1 more DDP process(es) before data preparation" in text and "MEMBER: 2/2" in text
    assert code == 1, text[-3000:]
    assert "checkpoint saved to" in text and "ended with status" not in text, text[-3000:]
    _, run = the_run(uri)
    assert run.info.status == "KILLED"
