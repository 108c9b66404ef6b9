"""`make train` runs the shipped CPU recipe (experiment=cpu_fast); `python train.py` composes the same recipe in one
process without the time budget, so a plain run (and every test) trains what was measured, minus the wall clock."""

from __future__ import annotations

from omegaconf import OmegaConf

from crackclf.config import cpu_data_parallel_devices
from tests.unit.test_configs import CONF, compose_train

# What the recipe adds to the defaults, and nothing else: data-parallel CPU processes (with the per-process batch that
# keeps 128 images a step on 2 cores) and a wall-time budget, with max_epochs as the budget's cap.
RECIPE_ONLY = {("trainer", "devices"), ("trainer", "strategy"), ("trainer", "use_distributed_sampler"),
               ("trainer", "max_epochs"), ("callbacks", "time_budget", "minutes"), ("data", "batch_size")}


def _leaves(values, prefix=()):
    if isinstance(values, dict):
        for key, value in values.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix, values


def test_defaults_are_the_cpu_fast_recipe_but_for_processes_and_time_budget():
    default = compose_train([])
    recipe = compose_train(["experiment=cpu_fast"])
    as_dicts = [OmegaConf.to_container(cfg) for cfg in (default, recipe)]
    for values in as_dicts:
        values.pop("hydra")
    default_leaves, recipe_leaves = (dict(_leaves(values)) for values in as_dicts)
    differing = {key for key in default_leaves.keys() | recipe_leaves.keys()
                 if default_leaves.get(key) != recipe_leaves.get(key)}
    assert differing == RECIPE_ONLY
    assert default.callbacks.time_budget.minutes is None and recipe.callbacks.time_budget.minutes == 4.75
    assert OmegaConf.to_container(recipe.trainer)["devices"] == "${cpu_ranks:2}" and default.trainer.devices == 1


def test_the_recipe_file_states_only_what_differs_from_the_defaults():
    """One source of truth: a value the recipe restated from the defaults would have to be kept equal by hand."""
    recipe = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / "cpu_fast.yaml"))
    chosen = OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml"))["defaults"]
    chosen = {group: option for item in chosen if isinstance(item, dict) for group, option in item.items()}
    for item in recipe.pop("defaults"):
        (key, option), = item.items()
        group = key.removeprefix("override /")
        assert chosen[group] != option, f"cpu_fast.yaml restates the default {group}: {option}"
    default = OmegaConf.to_container(compose_train([]))
    for key, value in _leaves(recipe):
        node = default
        for part in key:
            node = node[part]
        assert node != value, f"cpu_fast.yaml restates the default {'.'.join(key)}: {value}"


def test_cpu_ranks_one_process_per_core_up_to_the_cap_and_one_gpu(monkeypatch):
    import torch

    import crackclf.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cores, expected in ((1, 1), (2, 2), (16, 2)):
        monkeypatch.setattr(crackclf.utils, "worker_count", lambda cores=cores: cores)
        assert cpu_data_parallel_devices(2) == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_data_parallel_devices(2) == 1


def test_recipe_fine_tunes_the_pretrained_lite0_at_96px_with_its_early_stages_frozen():
    cfg = compose_train(["experiment=cpu_fast"])
    assert cfg.backbone.name == "tf_efficientnet_lite0" and str(cfg.backbone.pretrained).lower() == "true"
    assert cfg.backbone.freeze_groups == 5 and cfg.optimizer.lr == 0.002 and cfg.backbone.freeze_norm_stats is False
    assert cfg.data.image_size == 96
    assert cfg.callbacks.early_stopping.monitor == "val/loss"


def test_the_scratch_recipe_differs_from_the_default_only_in_its_network_and_learning_rate():
    recipe, scratch = (OmegaConf.to_container(compose_train([f"experiment={name}"]))
                       for name in ("cpu_fast", "cpu_scratch"))
    for values in (recipe, scratch):
        values.pop("hydra")
    differing = {key for key, value in dict(_leaves(scratch)).items() if dict(_leaves(recipe)).get(key) != value}
    assert {key[0] for key in differing} == {"backbone", "optimizer"}
    assert scratch["backbone"]["name"] == "lcnet_050" and scratch["backbone"]["pretrained"] is False
    assert scratch["optimizer"]["lr"] == 0.01
