"""model.head_lr_scale: the new classifier head trains at a multiple of the optimizer's learning rate, the rest of
the network at the rate itself, and the schedule moves both alike."""

from __future__ import annotations

import functools

import pytest
import torch

from crackclf.models.backbone import create_backbone
from crackclf.models.module import CrackClassifier
from crackclf.training.schedulers import warmup_cosine


def _model(head_lr_scale: float, lr: float = 1e-3) -> CrackClassifier:
    return CrackClassifier(functools.partial(create_backbone, "lcnet_050", pretrained=False),
                           optimizer=functools.partial(torch.optim.AdamW, lr=lr), image_size=32,
                           class_names=("no_crack", "crack"), label_smoothing=0.0, max_gap=0.003,
                           channels_last=False, head_lr_scale=head_lr_scale)


def test_the_head_is_a_group_of_its_own_at_the_scaled_rate():
    model = _model(10.0)
    groups = model.configure_optimizers().param_groups
    head = {id(p) for p in model.net.backbone.get_classifier().parameters()}
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(1e-2)]
    assert {id(p) for p in groups[1]["params"]} == head and head
    assert not head & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # every parameter, once


def test_a_scale_of_one_keeps_one_group_and_the_schedule_scales_every_group():
    assert len(_model(1.0).configure_optimizers().param_groups) == 1
    optimizer = _model(10.0).configure_optimizers()
    scheduler = warmup_cosine(optimizer, total_steps=100, warmup_fraction=0.1)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    body, head = (g["lr"] for g in optimizer.param_groups)
    assert head == pytest.approx(10 * body) and 0 < body < 1e-3  # mid warm-up, in proportion


def test_a_bad_scale_is_named():
    with pytest.raises(ValueError, match=r"model.head_lr_scale=0 must be > 0"):
        _model(0)
