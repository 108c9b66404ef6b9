"""Every YAML of every config group composes, and the objects it describes instantiate."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from crackclf.config import ConfigError, register_resolvers, validate
from tests.conftest import check_pretrained_source

CONF = Path(__file__).resolve().parents[2] / "conf"
OBJECT_GROUPS = ("data", "backbone", "augmentation", "optimizer", "scheduler", "trainer", "callbacks", "logger")


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    register_resolvers()  # explicitly: importing crackclf.config registers nothing
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def resolved(cfg, tmp_path: Path):
    """Fill the hydra-runtime interpolations (output dir) that only exist inside a real run."""
    cfg.paths.output_dir = str(tmp_path / "out")
    cfg.paths.root_dir = str(tmp_path)
    return cfg


@pytest.mark.parametrize("group", OBJECT_GROUPS + ("experiment", "hparams_search"))
def test_every_group_has_choices(group):
    if group in ("experiment", "hparams_search") and not (CONF / group).is_dir():
        pytest.skip(f"conf/{group} not present")
    assert choices(group), f"conf/{group} has no YAML files"


@pytest.mark.parametrize("group,choice", [(g, c) for g in OBJECT_GROUPS for c in choices(g)])
def test_each_choice_composes_and_instantiates(group, choice, tiny_dataset, tmp_path, mlflow_uri, offline_hub):
    # A multi-source config lists its folders in data.sources (data.root beside it is refused).
    data = f"data.sources=[{{root: {tiny_dataset}}}]" if choice == "multi_source" else f"data.root={tiny_dataset}"
    # Each YAML as written (its pretrained setting too), on a machine without the hub, as in CI.
    cfg = resolved(compose_train([f"{group}={choice}", data]), tmp_path)
    validate(cfg)
    node = cfg.get(group)
    if group == "data":
        datamodule = instantiate(node, augment=None)
        assert datamodule.image_size == cfg.data.image_size
    elif group == "backbone":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pretrained=auto without the hub warns by design (tested elsewhere)
            model = instantiate(cfg.model)
        check_pretrained_source(cfg.backbone.pretrained, model.pretrained_status)
        logits = model(torch.rand(2, 3, cfg.data.image_size, cfg.data.image_size))
        assert logits.shape == (2, 2)
    elif group == "augmentation":
        augment = instantiate(node)
        out = augment(torch.rand(4, 3, 32, 32))
        assert out.shape == (4, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    elif group == "optimizer":
        optimizer = instantiate(node)(params=[torch.nn.Parameter(torch.zeros(1))])
        assert isinstance(optimizer, torch.optim.Optimizer)
    elif group == "scheduler":
        if node is None:
            assert choice == "none"
            return
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        factory = instantiate(node)
        plateau = "ReduceLROnPlateau" in node._target_
        scheduler = factory(optimizer=optimizer, **({} if plateau else {"total_steps": 10}))
        rates = []
        for _ in range(10):  # the schedule moves the rate: down on a plateau, over the planned steps otherwise
            optimizer.step()
            scheduler.step(1.0) if plateau else scheduler.step()
            rates.append(optimizer.param_groups[0]["lr"])
        assert min(rates) < 0.1 * 0.5 and len(set(rates)) > 1, rates
    elif group == "trainer":
        if node.get("accelerator") == "gpu" and not torch.cuda.is_available():
            pytest.skip("trainer=gpu composes; instantiating it needs a GPU")
        trainer = instantiate(node, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == (1 if node.get("fast_dev_run") else node.max_epochs)
        assert trainer.accelerator.__class__.__name__.lower().startswith(
            "cpu" if node.accelerator in ("cpu", "auto") and not torch.cuda.is_available() else node.accelerator)
    elif group == "callbacks":
        callbacks = [instantiate(c) for c in (node or {}).values()]
        names = {type(c).__name__ for c in callbacks}
        assert names == (set() if choice == "none" else {
            "EarlyStopping", "ModelCheckpoint", "LearningRateMonitor", "TQDMProgressBar", "ProgressiveResize",
            "TimeBudget", "HardExampleFocus", "LinearProbeHead"}), names
    elif group == "logger":
        if node is None:
            assert choice == "none"
            return
        kwargs = {"run_id": None} if "MLFlow" in node._target_ else {}
        logger = instantiate(node, **kwargs)
        _ = logger.experiment  # Lightning creates the run (or the CSV folder) on first use
        logger.log_metrics({"probe": 1.0}, step=0)  # the logger records what training logs
        logger.finalize("success")
        if "MLFlow" in node._target_:
            from mlflow.tracking import MlflowClient

            assert MlflowClient(mlflow_uri).get_run(logger.run_id).data.metrics["probe"] == 1.0
        else:
            assert "probe" in (Path(logger.log_dir) / "metrics.csv").read_text()


def test_default_composition_is_valid(tiny_dataset, tmp_path):
    cfg = resolved(compose_train([f"data.root={tiny_dataset}"]), tmp_path)
    validate(cfg)
    assert OmegaConf.select(cfg, "model._target_").endswith("CrackClassifier")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optimizer.lr=-1", "optimizer.lr"),
        ("data.image_size=0", "data.image_size"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.root=/nonexistent/folder", "data.root"),
        ("backbone.name=resnet_18", "resnet18"),
        ("backbone.pretrained=maybe", "backbone.pretrained"),
    ],
)
def test_bad_values_name_the_key(override, expected, tiny_dataset, tmp_path):
    cfg = resolved(compose_train([f"data.root={tiny_dataset}", override]), tmp_path)
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        validate(cfg)


def test_empty_class_folder_is_refused(tmp_path):
    (tmp_path / "data" / "Negative").mkdir(parents=True)
    (tmp_path / "data" / "Positive").mkdir(parents=True)
    (tmp_path / "data" / "Positive" / "a.jpg").write_bytes(b"x")
    cfg = resolved(compose_train([f"data.root={tmp_path / 'data'}"]), tmp_path)
    with pytest.raises(ConfigError, match="Negative"):
        validate(cfg)
