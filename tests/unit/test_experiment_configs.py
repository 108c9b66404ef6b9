"""Experiment recipes, the Optuna search, the cluster/DDP configs and the sweep helpers compose and mean what
their docs say."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from crackclf.config import register_resolvers, validate
from crackclf.experiments.sweep import JobResult, best_job, direction_of, format_summary, override_params, varying_keys

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_train(overrides: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    register_resolvers()  # explicitly: importing crackclf.config registers nothing
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    cfg.paths.output_dir = str(tmp_path / "out")  # hydra-runtime interpolations only exist inside a real run
    cfg.paths.root_dir = str(tmp_path)
    return cfg


def test_gpu_transfer_is_pretrained_efficientnet_at_224_with_freeze_then_unfreeze(tiny_dataset, tmp_path):
    cfg = compose_train(["experiment=gpu_transfer", f"data.root={tiny_dataset}"], tmp_path)
    validate(cfg)
    assert cfg.backbone.name == "tf_efficientnet_lite0"  # its weights come from an installed package: offline
    assert cfg.backbone.pretrained is True and cfg.backbone.freeze_groups == 0
    assert 0 < cfg.backbone.freeze_epochs < cfg.trainer.max_epochs
    assert cfg.data.image_size == 224
    assert cfg.trainer.precision == "16-mixed"
    assert cfg.trainer.accelerator == "gpu"


def test_backbone_bench_sweeps_every_curated_backbone(tiny_dataset, tmp_path):
    cfg = compose_train(["experiment=backbone_bench", f"data.root={tiny_dataset}"], tmp_path)
    validate(cfg)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    swept = cfg.hydra.sweeper.params.backbone.split(",")
    assert sorted(swept) == sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))


def test_optuna_search_space_covers_lr_weight_decay_augmentation_and_image_size(tmp_path):
    cfg = compose_train(["hparams_search=optuna"], tmp_path)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/acc"
    assert sweeper.storage is None  # optuna 2.10's RDB storage is broken on SQLAlchemy 2 (docs/experiments.md)
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "augmentation", "data.image_size"}
    augmentations = sweeper.params.augmentation.removeprefix("choice(").removesuffix(")").split(",")
    assert {a.strip() for a in augmentations} <= {p.stem for p in (CONF / "augmentation").glob("*.yaml")}
    assert direction_of(cfg) == "maximize"


def test_ddp_trainer_and_slurm_launcher_compose(tmp_path):
    cfg = compose_train(["trainer=ddp", "hydra/launcher=slurm"], tmp_path)
    assert cfg.trainer.strategy.startswith("ddp") and cfg.trainer.use_distributed_sampler is False
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    launcher = instantiate(cfg.hydra.launcher)  # builds the submitit launcher; submits nothing
    assert type(launcher).__name__ == "SlurmLauncher"


def test_sweep_callback_is_registered_for_every_run(tmp_path):
    cfg = compose_train([], tmp_path)
    targets = [c._target_ for c in cfg.hydra.callbacks.values()]
    assert "crackclf.experiments.sweep.MlflowSweepCallback" in targets


def test_direction_follows_the_metric_name_without_a_sweeper_setting():
    assert direction_of(OmegaConf.create({"optimized_metric": "val/loss"})) == "minimize"
    assert direction_of(OmegaConf.create({"optimized_metric": "val/acc"})) == "maximize"


def test_best_job_ignores_failed_jobs_and_honours_direction():
    jobs = [JobResult("0", "a", "FINISHED", "optimizer.lr=0.1", 0.7, ""),
            JobResult("1", "b", "FAILED", "optimizer.lr=-1", None, "ConfigError: optimizer.lr=-1 must be > 0"),
            JobResult("2", "c", "FINISHED", "optimizer.lr=0.01", 0.9, "")]
    assert best_job(jobs, "maximize").run_id == "c"
    assert best_job(jobs, "minimize").run_id == "a"
    assert best_job(jobs[1:2], "maximize") is None
    summary = format_summary("s1", "val/acc", "maximize", jobs, best_job(jobs, "maximize"))
    assert "3 jobs: 2 finished, 1 failed" in summary
    assert "- job 1 `lr=-1` (FAILED): ConfigError" in summary
    assert "Best: job 2 (run c)" in summary


def test_override_parsing_and_varying_keys():
    assert override_params("a.b=1 backbone=resnet18 +x.y='p q' ~z") == {"a.b": "1", "backbone": "resnet18",
                                                                        "x.y": "p q"}
    runs = [override_params("data.root=/d optimizer.lr=0.1"), override_params("data.root=/d optimizer.lr=0.2")]
    assert varying_keys(runs) == ["optimizer.lr"]
    assert varying_keys(runs[:1]) == ["data.root", "optimizer.lr"]


@pytest.mark.parametrize("bad", ["nokey", "=value"])
def test_compare_tag_filter_must_be_key_value(bad):
    from crackclf.experiments.compare import parse_tags

    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_tags([bad])
