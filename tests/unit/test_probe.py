"""callbacks.linear_probe: the new classifier head fitted as a logistic regression on the network's features before
the first training step (LP-FT)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from crackclf.models.backbone import create_backbone
from crackclf.models.module import CrackClassifier
from crackclf.training.probe import LinearProbeHead, fit_logistic_head, smoothed_loss_scale


def _blobs(count: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping Gaussian classes, their features of very different scales and offsets."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    features = torch.randn(count, width, generator=generator)
    features[:, 0] += 1.5 * labels  # the informative direction
    scale = torch.logspace(-2, 2, width)
    return features * scale + 7.0, labels


def test_the_head_is_the_penalised_logistic_regression_on_raw_features():
    features, labels = _blobs(400, 6)
    weight, bias = fit_logistic_head(features, labels, l2=1e-3)
    assert weight.shape == (2, 6) and bias.shape == (2,)
    # Its softmax is sigmoid(w.x + b), and (w, b) is a stationary point of the penalised loss on standardised
    # features: the fitted regression itself, not just some separating line.
    mean, scale = features.double().mean(0), features.double().std(0)
    w = ((weight[1] - weight[0]).double() * scale).requires_grad_(True)
    b = (bias[1] - bias[0]).double() + ((weight[1] - weight[0]).double() * mean).sum()
    b = b.detach().requires_grad_(True)
    z = (features.double() - mean) / scale
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, labels.double()) + 1e-3 * (w @ w)
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs() < 1e-4
    probabilities = (features @ weight.T + bias).softmax(1)[:, 1]
    assert ((probabilities > 0.5).long() == labels).float().mean() > 0.7  # it learned the informative direction
    assert abs(w[0].item()) > 5 * w[1:].abs().max().item()
    # The same loss as the network's cross-entropy on the head's two logits.
    logits = features.double() @ weight.T.double() + bias.double()
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels)
    assert cross_entropy.item() == pytest.approx(loss.item() - 1e-3 * (w @ w).item(), rel=1e-4)


def test_the_candidates_scale_minimises_the_smoothed_loss_and_keeps_the_decisions():
    features, labels = _blobs(400, 6)
    features[:, 0] += 3.0 * labels  # well separated: the regression is confident, smoothing wants it less so
    weight, bias = fit_logistic_head(features, labels, l2=1e-4)
    logits = (features @ weight.T + bias).double()
    scale = smoothed_loss_scale(logits, labels, 0.05)
    assert 0 < scale < 1  # less confident than the hard-label fit

    def smoothed(factor: float) -> float:
        return torch.nn.functional.cross_entropy(logits * factor, labels, label_smoothing=0.05).item()

    assert smoothed(scale) < min(smoothed(scale * 0.9), smoothed(scale * 1.1), smoothed(1.0))
    assert torch.equal((logits * scale).argmax(1), logits.argmax(1))
    assert smoothed_loss_scale(logits, labels, 0.0) == 1.0


def test_a_larger_penalty_gives_a_smaller_head_and_one_class_is_refused():
    features, labels = _blobs(400, 6)
    small, _ = fit_logistic_head(features, labels, l2=1e-4)
    large, _ = fit_logistic_head(features, labels, l2=1e-1)
    assert large.norm() < small.norm()
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic_head(features, torch.zeros(400, dtype=torch.long), l2=1e-3)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"callbacks.linear_probe.images=-1"):
        LinearProbeHead(images=-1, l2=1e-3)
    with pytest.raises(ValueError, match=r"callbacks.linear_probe.l2=0"):
        LinearProbeHead(images=10, l2=0)


class _Images:
    """The datamodule surface the probe uses: unaugmented training batches and the model's input transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.train_rows_count = len(labels)
        self.asked: int | None = None
        self.augmented: set[bool] = set()  # what model_input was asked for

    def train_sample_dataloader(self, size: int):
        self.asked = size
        return [(self.images[i:i + 16], self.labels[i:i + 16]) for i in range(0, size, 16)]

    def model_input(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        self.augmented.add(augment)
        return images.float().transpose(-1, -2) / 255 if augment else images.float() / 255  # 'augmentation': rot90


def _model_and_images() -> tuple[CrackClassifier, torch.Tensor, torch.Tensor, _Images, SimpleNamespace]:
    """A small network said to be pretrained, 64 generated images (the crack class: a bright horizontal band) and
    the trainer surface the probe reads."""
    torch.manual_seed(0)
    model = CrackClassifier(functools.partial(create_backbone, "lcnet_050", pretrained=False),
                            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), image_size=32,
                            class_names=("no_crack", "crack"), label_smoothing=0.0, max_gap=0.003,
                            channels_last=False)
    model.pretrained_status = "local:weights.pth"  # the probe is for pretrained features (scratch: below)
    labels = torch.arange(64) % 2
    images = torch.randint(0, 120, (64, 3, 32, 32), dtype=torch.uint8)
    images[labels == 1, :, 12:20, :] = 255
    data = _Images(images, labels)
    trainer = SimpleNamespace(global_step=0, current_epoch=0, world_size=1, datamodule=data, logger=None)
    return model, images, labels, data, trainer


def test_the_callback_sets_the_head_from_the_networks_features_once():
    model, images, labels, data, trainer = _model_and_images()
    model.net.train()
    before = model.net.backbone.get_classifier().weight.detach().clone()
    probe = LinearProbeHead(images=48, l2=1e-3)
    probe.on_train_start(trainer, model)
    assert data.asked == 48 and data.augmented == {False}  # unaugmented images by default
    assert model.net.training  # put back in training mode
    with torch.no_grad():
        predicted = model.net.eval()(images.float() / 255).argmax(1)
    assert probe.train_accuracy > 0.9 and (predicted == labels).float().mean() > 0.9
    after = model.net.backbone.get_classifier().weight.detach().clone()
    assert not torch.equal(before, after)
    # A resumed run (steps already taken) keeps its trained head.
    probe.on_train_start(SimpleNamespace(**{**vars(trainer), "global_step": 5}), model)
    assert torch.equal(model.net.backbone.get_classifier().weight, after)
    # A run started from a trained model (init_from) keeps that model's head too.
    fresh = LinearProbeHead(images=48, l2=1e-3)
    model.head_trained = True
    with torch.no_grad():
        model.net.backbone.get_classifier().weight.zero_()
    fresh.on_train_start(trainer, model)
    assert fresh.train_accuracy is None and not model.net.backbone.get_classifier().weight.any()
    # Unless asked to refit it (keep_trained_head=false): then the head is fitted on this run's images again.
    refit = LinearProbeHead(images=48, l2=1e-3, keep_trained_head=False)
    refit.on_train_start(trainer, model)
    assert refit.train_accuracy > 0.9 and model.net.backbone.get_classifier().weight.any()
    # A backbone trained from scratch keeps its random head: a probe on random features only saturates outputs.
    model.head_trained, model.pretrained_status = False, "scratch"
    with torch.no_grad():
        model.net.backbone.get_classifier().weight.zero_()
    scratch = LinearProbeHead(images=48, l2=1e-3)
    scratch.on_train_start(trainer, model)
    assert scratch.train_accuracy is None and not model.net.backbone.get_classifier().weight.any()


def test_the_probe_can_fit_on_augmented_images():
    # callbacks.linear_probe.augment=true: the head is fitted on the images as the training augmentation shows them
    # (here a transpose, which turns the crack class's horizontal band vertical), so it recognises those.
    model, images, labels, data, trainer = _model_and_images()
    probe = LinearProbeHead(images=48, l2=1e-3, augment=True)
    probe.on_train_start(trainer, model)
    assert data.augmented == {True} and probe.train_accuracy > 0.9
    with torch.no_grad():
        on_augmented = model.net.eval()(images.float().transpose(-1, -2) / 255).argmax(1)
    assert (on_augmented == labels).float().mean() > 0.9
