"""The GPU path, as a user with a CUDA GPU runs it (skipped where PyTorch sees none, e.g. CI and 2-core laptops).

`python train.py trainer=gpu` trains in 16-bit mixed precision with the decoded cache and the batch augmentation on
the GPU; `crackclf predict --device cuda` runs the model there and agrees with the CPU's ONNX Runtime.
"""

from __future__ import annotations

import csv

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_datamodule_keeps_cache_and_augmentation_on_the_gpu(tiny_dataset, tmp_path, cache_dir):
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from crackclf.config import compose_config

    # paths.* normally come from the Hydra run; fixed here since no run is started.
    cfg = compose_config([f"data.root={tiny_dataset}", "data.progress=false", "data.image_size=64",
                          f"data.cache_dir={cache_dir}", f"paths.root_dir={tmp_path}",
                          f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    datamodule = instantiate(cfg.data, augment=instantiate(cfg.augmentation))
    trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False)
    datamodule.trainer = trainer
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    # The cache lives on the GPU: batches are gathered there, never copied from host memory.
    assert images.device.type == "cuda" and images.dtype == torch.uint8 and labels.device.type == "cuda"
    augmented = datamodule.model_input(images, augment=True)
    plain = datamodule.model_input(images, augment=False)
    assert augmented.device.type == "cuda" and augmented.dtype == torch.float32
    assert augmented.shape == plain.shape == (len(images), 3, 64, 64)
    assert float(augmented.min()) >= 0.0 and float(augmented.max()) <= 1.0
    assert not torch.equal(augmented, plain)  # the augmentation ran (on the GPU)
    assert torch.equal(plain, images.float() / 255)


def test_train_on_gpu_then_predict_on_gpu_matches_cpu(tiny_dataset, tmp_path, mlflow_uri, cache_dir):
    result = run_train(f"data.root={tiny_dataset}", "trainer=gpu", "trainer.max_epochs=2", "data.image_size=64",
                       "data.batch_size=16", "data.progress=false", "callbacks.progress_bar.refresh_rate=0",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("crack").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["device"].startswith("cuda:0 (")
    assert run.data.params["trainer.precision"] == "16-mixed"
    assert len(client.get_metric_history(run.info.run_id, "train/acc")) == 2

    rows = {}
    for device, backend in (("cuda", "torch"), ("cpu", "onnx")):
        out = tmp_path / f"{device}.csv"
        predicted = run_cli("predict", "--model", f"runs:/{run.info.run_id}", str(tiny_dataset), "--out", str(out),
                            "--device", device, "--backend", backend, "--no-progress")
        assert predicted.returncode == 0, predicted.stderr[-3000:]
        with out.open() as handle:
            rows[device] = {r["path"]: float(r["probability"]) for r in csv.DictReader(handle)}
    assert len(rows["cuda"]) == 80 and rows["cuda"].keys() == rows["cpu"].keys()
    # Same weights, fp32 on both: cuDNN and ONNX Runtime differ only in the order of float sums.
    assert max(abs(rows["cuda"][p] - rows["cpu"][p]) for p in rows["cpu"]) < 1e-3


def test_one_bundle_serves_a_gpu_and_an_onnx_predictor():
    """The in-memory ONNX export copes with a network that a PyTorch predictor has moved to the GPU."""
    import numpy as np

    from crackclf.bundle import BundleInfo, LoadedModel, build_network
    from crackclf.inference.predictor import Predictor
    from crackclf.models.backbone import IMAGENET_MEAN, IMAGENET_STD

    info = BundleInfo("lcnet_050", 64, IMAGENET_MEAN, IMAGENET_STD)
    model = LoadedModel(info, "untrained", network=build_network(info).eval())
    on_gpu = Predictor(model, backend="torch", device="cuda")
    on_cpu = Predictor(model, backend="onnx")
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    assert next(model.network.parameters()).device.type == "cuda"  # left where the PyTorch predictor put it
    assert np.abs(on_gpu.predict_arrays(images) - on_cpu.predict_arrays(images)).max() < 1e-3


def test_device_names_are_checked():
    from crackclf.inference.predictor import resolve_device

    assert resolve_device("auto").type == "cuda"
    with pytest.raises(ValueError, match="cuda:99"):
        resolve_device("cuda:99")
