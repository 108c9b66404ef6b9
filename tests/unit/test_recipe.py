"""The default composition is the shipped CPU recipe (experiment=cpu_fast), so `make train` runs what was measured."""

from __future__ import annotations

from omegaconf import OmegaConf

from tests.unit.test_configs import compose_train


def test_defaults_equal_cpu_fast_recipe():
    default = compose_train([])
    recipe = compose_train(["experiment=cpu_fast"])
    as_dicts = [OmegaConf.to_container(cfg) for cfg in (default, recipe)]
    for values in as_dicts:
        values.pop("hydra")
    assert as_dicts[0] == as_dicts[1]


def test_recipe_trains_lcnet_from_scratch_at_96px():
    cfg = compose_train(["experiment=cpu_fast"])
    assert cfg.backbone.name == "lcnet_050" and str(cfg.backbone.pretrained).lower() == "false"
    assert cfg.data.image_size == 96
    assert cfg.callbacks.early_stopping.monitor == "val/loss"
