"""The backbone is a Hydra factory (``conf/backbone/*.yaml``: ``_target_`` create_backbone with ``_partial_``)
injected into the LightningModule; its settings (pretrained, weights, freeze_groups, freeze_epochs) act as before, and
checkpoints written before the factory existed still load and resume."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
from hydra.utils import instantiate

from crackclf.bundle import BundleInfo, load_model
from crackclf.models.backbone import BuiltBackbone, create_backbone
from tests.conftest import check_pretrained_source, tiny_fit, write_dataset
from tests.unit.test_configs import choices, compose_train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OLD_CHECKPOINT = FIXTURES / "bundle_v1.ckpt"  # written by the code before the factory (tests/fixtures/README.md)


@pytest.mark.parametrize("choice", choices("backbone"))
def test_every_backbone_file_declares_the_factory_and_builds_what_it_names(choice, offline_hub):
    cfg = compose_train([f"backbone={choice}"])  # as written, pretrained setting included; no hub, as in CI
    assert cfg.backbone._target_ == "crackclf.models.backbone.create_backbone" and cfg.backbone._partial_ is True
    factory = instantiate(cfg.backbone)
    assert isinstance(factory, functools.partial)  # nothing is built until the module asks, with its class count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pretrained=auto without the hub warns by design (tested elsewhere)
        built = factory(num_classes=len(cfg.data.class_names))
    assert isinstance(built, BuiltBackbone) and built.name == cfg.backbone.name
    assert built.model.get_classifier().out_features == 2 and built.freeze_epochs == cfg.backbone.freeze_epochs
    assert built.timm_kwargs == dict(cfg.backbone.kwargs)
    check_pretrained_source(cfg.backbone.pretrained, built.pretrained_status)


def test_the_module_records_the_architecture_it_built_for_the_bundle():
    cfg = compose_train(["backbone=lcnet_050", "+backbone.kwargs.drop_path_rate=0.1"])
    model = instantiate(cfg.model)
    assert model.backbone_name == "lcnet_050" and model.timm_kwargs == {"drop_path_rate": 0.1}
    assert "backbone" not in model.hparams  # a factory is code; the bundle entry is what rebuilds the network
    assert model.hparams.image_size == cfg.data.image_size


class _Trainable(pl.Callback):
    """Which parts train at each epoch's first step: the stem (a frozen group), the last stage, the head."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[bool, bool, bool]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_index: int) -> None:
        net = module.net.backbone
        self.seen.setdefault(trainer.current_epoch, (net.conv_stem.weight.requires_grad,
                                                     net.blocks[-1][0].conv_dw.weight.requires_grad,
                                                     net.get_classifier().weight.requires_grad))


def test_weights_freeze_groups_and_freeze_epochs_from_the_yaml_act_in_a_real_fit(tiny_dataset, tmp_path):
    start = timm.create_model("lcnet_050", num_classes=2)
    torch.save(start.state_dict(), tmp_path / "start.pth")
    cfg = compose_train(["backbone=lcnet_050", f"backbone.weights={tmp_path / 'start.pth'}",
                         "backbone.freeze_groups=1", "backbone.freeze_epochs=1"])
    factory = instantiate(cfg.backbone)
    built = factory(num_classes=2)
    assert built.pretrained_status == "local:start.pth"
    loaded, saved = built.model.state_dict(), start.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    trainable = _Trainable()
    tiny_fit(tiny_dataset, tmp_path, [trainable], epochs=2, backbone=factory)
    # epoch 0: only the head (freeze_epochs=1); epoch 1: all but the stem (freeze_groups=1 holds all run)
    assert trainable.seen == {0: (False, False, True), 1: (False, True, True)}


def test_a_checkpoint_written_before_the_factory_loads_with_the_same_predictions():
    loaded = load_model(OLD_CHECKPOINT)
    assert loaded.info.backbone == "test_efficientnet" and loaded.info.timm_kwargs == {"drop_path_rate": 0.05}
    assert loaded.info.threshold == pytest.approx(0.4) and loaded.info.version == 1
    expected = json.loads((FIXTURES / "bundle_v1.json").read_text())["crack_probabilities"]
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probabilities = loaded.network(images).softmax(1)[:, 1]
    assert probabilities.tolist() == pytest.approx(expected, abs=1e-6)
    assert isinstance(BundleInfo.from_dict(torch.load(OLD_CHECKPOINT, weights_only=False)["crackclf"]), BundleInfo)


def test_a_run_resumes_from_a_checkpoint_written_before_the_factory(tmp_path):
    dataset = write_dataset(tmp_path / "data", per_class=20, size=48, seed=5)  # the fixture's data set
    backbone = functools.partial(create_backbone, "test_efficientnet", pretrained=False, drop_rate=0.1,
                                 kwargs={"drop_path_rate": 0.05})
    _, trainer = tiny_fit(dataset, tmp_path, [], epochs=2, backbone=backbone, ckpt_path=str(OLD_CHECKPOINT))
    assert trainer.current_epoch == 2 and len(trainer.lightning_module.history) == 2  # epoch 0's from the file


@pytest.mark.parametrize("freeze_norm_stats", [True, False])
def test_freeze_norm_stats_keeps_every_batchnorm_statistic_while_its_scale_trains(tiny_dataset, tmp_path,
                                                                                 freeze_norm_stats):
    start = timm.create_model("lcnet_050", num_classes=2)
    torch.save(start.state_dict(), tmp_path / "start.pth")
    cfg = compose_train(["backbone=lcnet_050", f"backbone.weights={tmp_path / 'start.pth'}",
                         f"backbone.freeze_norm_stats={str(freeze_norm_stats).lower()}"])
    factory = instantiate(cfg.backbone)
    _, trainer = tiny_fit(tiny_dataset, tmp_path, [], epochs=1, backbone=factory)
    trained, saved = trainer.lightning_module.net.backbone.state_dict(), start.state_dict()
    statistics = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    scales = [k for k in saved if k.endswith(".weight") and k.replace(".weight", ".running_mean") in saved]
    assert statistics and scales
    kept = [torch.equal(trained[k], saved[k]) for k in statistics]
    assert all(kept) if freeze_norm_stats else not any(kept)
    assert not all(torch.equal(trained[k], saved[k]) for k in scales)  # the layers' scale and shift still learn


def test_freeze_norm_stats_is_ignored_with_a_warning_on_a_network_from_scratch(caplog):
    with caplog.at_level("WARNING", logger="crackclf.models.backbone"):
        built = create_backbone("lcnet_050", pretrained=False, num_classes=2, freeze_norm_stats=True)
    assert built.frozen_norms == []
    assert "backbone.freeze_norm_stats=true ignored" in caplog.text and "scratch" in caplog.text
