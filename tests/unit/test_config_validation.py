"""Config mistakes are caught before any data is read, in one short paragraph that says what is valid."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from crackclf.config import ConfigError, check_overrides, register_resolvers, validate
from tests.conftest import REPO

CONF = REPO / "conf"


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data.batchsize=8"], ["data has no key 'batchsize'", "Did you mean data.batch_size?",
                            "Valid keys of data: _target_, batch_size, cache,", "+data.batchsize="]),
    (["optimizer.lrr=1"], ["optimizer has no key 'lrr'", "Did you mean optimizer.lr?",
                           "Valid keys of optimizer: _partial_, _target_, lr"]),
    (["seedd=3"], ["the top level has no key 'seedd'", "Did you mean seed?"]),
    (["scheduler=cosine", "scheduler.factor=0.5"], ["scheduler has no key 'factor'",
                                                    "Valid keys of scheduler: _partial_, _target_, min_lr_ratio"]),
    (["backbone=no_such_net"], ["there is no conf/backbone/no_such_net.yaml", "Options: convnext_atto,",
                                "resnet10t, resnet18, tf_efficientnet_lite0."]),
    (["backbone=resnet1"], ["Did you mean backbone=resnet18?", "Close timm model names (for backbone.name=...):"]),
    (["backbone=resnet50"], ["'resnet50' is a timm model", "backbone=resnet18 backbone.name=resnet50"]),
    (["backbone=resnet18,lcnet_05"], ["backbone=lcnet_05:", "Did you mean backbone=lcnet_050?"]),
])
def test_misspelt_keys_and_options_list_what_is_valid(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        check_overrides(overrides, CONF)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("overrides", [
    ["data.batch_size=8", "trainer=cpu", "scheduler=plateau", "scheduler.factor=0.5"],
    ["backbone=resnet18,lcnet_050", "optimizer.lr=0.1,0.2"],  # sweeps: every option is checked
    ["+data.extra=1", "~callbacks.lr_monitor", "hydra.run.dir=/tmp/x", "logger=csv", "logger.name=x"],
])
def test_valid_overrides_pass(overrides):
    check_overrides(overrides, CONF)


def compose_cfg(*overrides: str):
    register_resolvers()  # explicitly: importing crackclf.config registers nothing
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize(("override", "expected"), [
    ("data.image_size=5000", "data.image_size=5000 must be an integer between 16 and 1024"),
    ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
    ("optimizer.lr=-1", "optimizer.lr=-1 must be > 0"),
    ("data.val_fraction=0.8", "leaves too little to train on"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5 must be between 0 and 1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 must be an integer >= 1"),
    ("model.label_smoothing=0.9", "model.label_smoothing=0.9 must be in [0, 0.5)"),
    ("data.root=/nonexistent", "data.root=/nonexistent is not a folder"),
    ("backbone.name=resnet_nope", "backbone.name='resnet_nope' is not a timm model. Close matches:"),
    ("trainer.devices=2", "trainer.use_distributed_sampler=true with trainer.devices=2 and trainer.strategy=auto"),
    ("+trainer.strategy=ddp", "Set trainer.use_distributed_sampler=false, or use trainer=ddp or trainer=cpu_ddp"),
    ("data.sources=[/nonexistent]", "data.sources[0].root=/nonexistent is not a folder"),
    ("data.sources=[{root: null, colour: red}]", "data.sources[0] has unknown key(s) ['colour']"),
    ("data.sources=[{root: null, weight: 0}]", "data.sources[0].weight=0 must be a number > 0"),
    ("data.sources=[{root: null, name: 'a b'}]", "source name 'a b' may hold only letters"),
    ("data.sources=[{root: null}, {root: null}]", "the name(s) ['concrete_crack'] are used twice"),
    ("data.sources=[]", "data.sources=[] is empty"),
])
def test_out_of_range_values_are_refused_by_validate(override, expected):
    with pytest.raises(ConfigError) as caught:
        validate(compose_cfg(override))
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_data_sources_beside_data_root_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.root=.* and data.sources are both set"):
        validate(compose_cfg(f"data.root={tmp_path}", "data.sources=[{root: null}]"))
    validate(compose_cfg("data=multi_source", "data.sources.1.root=null", "data.sources.1.class_dirs=null"))


@pytest.mark.parametrize("overrides", [
    ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    ["trainer=cpu_ddp", "trainer.devices=2"],
    ["trainer.devices=1"],
    ["trainer.devices=2", "+trainer.use_distributed_sampler=false"],
])
def test_multi_device_trainers_that_keep_the_datamodules_sampler_pass(overrides):
    validate(compose_cfg(*overrides))


#: ``python train.py ARGS`` run through runpy, recording on the way out (however it exits) which of the heavy
#: libraries the process had imported by then.
IMPORT_PROBE = """import runpy, sys
marker, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(marker, "w") as handle:
        handle.write(" ".join(m for m in ("torch", "pytorch_lightning", "timm", "mlflow") if m in sys.modules))
"""


def train(tmp_path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python train.py ARGS`` (as the import probe); returns the result and the heavy libraries imported."""
    marker = tmp_path / "imported.txt"
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(marker), str(REPO / "train.py"), *args,
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, **(env or {})})
    return result, marker.read_text().split()


@pytest.mark.parametrize(("override", "expected", "needs"), [
    # a backbone name is also looked up among timm's models (for a "close timm model names" hint): timm, torch
    ("backbone=no_such_net", "there is no conf/backbone/no_such_net.yaml", ["torch", "timm"]),
    ("data.root=/nonexistent", "data.root=/nonexistent is not a folder", []),
    ("data.batchsize=8", "Did you mean data.batch_size?", []),
])
def test_train_py_reports_config_mistakes_in_one_paragraph_quickly(tmp_path, override, expected, needs):
    result, imported = train(tmp_path, override)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.startswith("crackclf: error: ") and expected in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr  # one paragraph, no traceback
    # Quickly: refused before Lightning and MLflow (and, but for the backbone hint, torch and timm) were imported:
    # their import is most of a start-up; nothing was trained and no store was made.
    assert imported == needs, imported
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_crackclf_debug_shows_the_traceback(tmp_path):
    result, _ = train(tmp_path, "data.root=/nonexistent", env={"CRACKCLF_DEBUG": "1"})
    assert result.returncode == 2 and "Traceback (most recent call last)" in result.stderr
    assert "ConfigError: data.root=/nonexistent is not a folder" in result.stderr


def test_threshold_modes_are_the_ones_choose_threshold_knows():
    from crackclf.metrics import THRESHOLD_MODES

    for mode in THRESHOLD_MODES:
        validate(compose_cfg(f"threshold.mode={mode}"))
    with pytest.raises(ConfigError, match="threshold.mode='youden' must be 'f1', 'recall' or 'balanced'"):
        validate(compose_cfg("threshold.mode=youden"))
    with pytest.raises(ConfigError, match="threshold.source=new names a source of data.sources"):
        validate(compose_cfg("threshold.source=new"))
