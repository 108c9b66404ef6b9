"""The composed config is the one source of truth: constructors do not carry recipe values of their own, and the
resolvers the YAML uses are registered by whoever composes it, not by importing a module."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra._internal.utils import _locate
from omegaconf import DictConfig, OmegaConf

from tests.unit.test_configs import compose_train

REPO = Path(__file__).resolve().parents[2]
#: Nodes whose values are the recipe's, stated in one file each (group alternatives such as a backbone or an
#: augmentation differ per option by design; their constructors keep neutral "off" defaults).
RECIPE_NODES = ("model", "scheduler", "callbacks.progressive_resize", "callbacks.time_budget",
                "callbacks.hard_example_focus", "data")


@pytest.mark.parametrize("path", RECIPE_NODES)
def test_no_constructor_default_disagrees_with_the_yaml(path):
    # The data node's batch size is the one value an experiment changes on purpose (cpu_fast: per process).
    for overrides in ([], ["experiment=cpu_fast"]) if path != "data" else ([],):
        cfg = compose_train(overrides)
        node = OmegaConf.select(cfg, path)
        parameters = inspect.signature(_locate(node._target_)).parameters
        for key in node:
            if key.startswith("_") or key not in parameters or parameters[key].default is inspect.Parameter.empty:
                continue
            if OmegaConf.is_interpolation(node, key):  # a path or the run's seed: the YAML's job, not a default
                continue
            value = OmegaConf.select(cfg, f"{path}.{key}")
            if isinstance(value, DictConfig):  # an object of its own group (model.scheduler): checked there
                continue
            assert value == parameters[key].default, (
                f"{node._target_}({key}={parameters[key].default!r}) but {path}.{key} is {value!r}: state it once")


def _fresh_interpreter(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_resolvers_are_registered_by_the_caller_not_by_an_import_and_registering_twice_is_harmless():
    found = _fresh_interpreter("""
import json
from omegaconf import OmegaConf
import crackclf.config, crackclf.train  # the entry module and the config module: neither registers on import
from crackclf.config import RESOLVERS, register_resolvers
from tests.unit.test_configs import CONF
from hydra import compose, initialize_config_dir
out = {"after_import": [OmegaConf.has_resolver(name) for name in RESOLVERS]}
with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
    cfg = compose("train", overrides=["experiment=cpu_fast"])
try:
    cfg.trainer.devices
except Exception as error:
    out["unregistered"] = f"{type(error).__name__}: {error}"
register_resolvers()
register_resolvers()
out["devices"] = cfg.trainer.devices
out["tracking_uri"] = cfg.logger.tracking_uri
print(json.dumps(out))
""")
    assert found["after_import"] == [False, False]
    assert "cpu_ranks" in found["unregistered"] and "trainer.devices" in found["unregistered"]
    assert found["devices"] in (1, 2) and found["tracking_uri"]
