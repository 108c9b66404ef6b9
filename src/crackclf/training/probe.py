"""Linear probe, then fine-tune: fit the new classifier head on the pretrained features before the first step.

A fresh, random head on top of ImageNet features sends large, arbitrary gradients into the layers being fine-tuned
during the first steps, which both wastes a short CPU budget and distorts the pretrained features (Kumar et al.,
"Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022: LP-FT). Here, before
the first training step, the head is fitted as a logistic regression on the frozen network's features of a sample
of unaugmented training images, in closed loop (L-BFGS, a few seconds on a CPU); fine-tuning then starts from it.
What it scores and what it costs: `make bench-recipe`, docs/transfer.md.

With ``checkpoint: true`` the probed model is also scored on the validation split and saved as the run's first best
checkpoint, so the fine-tuned weights replace it only when they beat it on the checkpoint's monitor: a machine that
fits too few fine-tuning steps to gain anything (early steps cost accuracy before they add any: docs/recipe.md)
ships the probed model instead of worse weights.
"""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl
import torch
from torch import nn

from crackclf.distributed import gather_to_cpu
from crackclf.errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["LinearProbeHead", "fit_logistic_head", "smoothed_loss_scale"]


class LinearProbeHead(pl.Callback):
    """Before the first training step, set the classifier head to a logistic regression fitted on the network's
    features (the input of its classifier) of ``images`` training images (unaugmented unless ``augment``).

    Skipped on a resumed run, on a backbone without pretrained weights (a random network's features mean
    nothing), on a run started from a trained model (``init_from``: its head is kept, unless ``keep_trained_head``
    is false), and with ``images: 0``. Under DDP each rank computes the features of its share and every rank fits
    the same head on all of them (gathered at ``on_train_start``, which every rank reaches once, in the same order:
    the project's DDP rule, see ``CrackClassifier.on_train_epoch_end``).

    Args:
        images: training images the head is fitted on (0: off, the head stays as initialised).
        l2: L2 penalty on the head's weights, per image, on standardised features.
        keep_trained_head: on a run started from a trained model (``init_from``), keep its head (``False``: refit it
            on this run's training images, e.g. a new surface's mix in ``experiment=adapt``).
        checkpoint: score the probed model on the validation split and save it as the first best checkpoint of the
            run's ``ModelCheckpoint`` (monitor ``val/loss`` or ``val/acc``): fine-tuned weights are kept only when
            they score better. Costs one pass over the validation images before the first step.
        augment: fit the head on the features of the images through the run's training augmentation (each seen
            once) instead of unaugmented: the probed model then sees what training shows, e.g. painted joints.
            Off by default: it cost accuracy on the data set's test split and gained nothing on other surfaces
            (docs/transfer.md, "Straight joints").
    """

    def __init__(self, images: int, l2: float, keep_trained_head: bool = True, checkpoint: bool = False,
                 augment: bool = False) -> None:
        if images < 0:
            raise UsageError(f"callbacks.linear_probe.images={images} must be >= 0 (0 switches the probe off).")
        if l2 <= 0:
            raise UsageError(f"callbacks.linear_probe.l2={l2} must be > 0: the head's L2 penalty, e.g. 1e-3.")
        self.images, self.l2, self.keep_trained_head = int(images), float(l2), bool(keep_trained_head)
        self.checkpoint, self.augment = bool(checkpoint), bool(augment)
        self.train_accuracy: float | None = None
        self.val_scores: dict[str, float] | None = None  # the probed model's val/loss and val/acc (checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.images or trainer.global_step > 0 or trainer.current_epoch > 0:
            return
        if str(getattr(pl_module, "pretrained_status", "")).startswith("scratch"):
            # A random network's features mean nothing, and a head fitted on them only saturates the outputs.
            log.info("linear probe: skipped, the backbone is trained from scratch")
            return
        if self.keep_trained_head and getattr(pl_module, "head_trained", False):
            log.info("linear probe: skipped, the head is the start model's (init_from)")
            return
        started = time.monotonic()
        world = max(1, trainer.world_size)
        datamodule = trainer.datamodule
        count = min(self.images, datamodule.train_rows_count)
        count -= count % world  # an equal share per rank: the gather needs equal shapes
        features, labels = _features(pl_module, datamodule, datamodule.train_sample_dataloader(count), self.augment)
        features, labels = _gathered(trainer, features, labels)
        head = pl_module.net.backbone.get_classifier()
        weight, bias = fit_logistic_head(features, labels, self.l2)
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            head.bias.copy_(bias.to(head.bias))
        logits = features.double() @ weight.T.double() + bias.double()
        self.train_accuracy = float((logits.argmax(1) == labels).double().mean())
        seconds = time.monotonic() - started
        log.info("linear probe: the head fitted on %d training images' features in %.1f s (their accuracy %.4f)",
                 len(labels), seconds, self.train_accuracy)
        metrics = {"probe/train_acc": self.train_accuracy, "probe/seconds": seconds, "probe/images": float(len(labels))}
        if self.checkpoint:
            scale = smoothed_loss_scale(logits, labels, _label_smoothing(pl_module))
            self._checkpoint_probed_model(trainer, pl_module, datamodule, scale)
            if self.val_scores is not None:
                metrics |= {f"probe/{name}": value for name, value in self.val_scores.items()}
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=0)

    def _checkpoint_probed_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule,
                                 scale: float) -> None:
        """Score the probed model, its head's logits multiplied by ``scale``, on the validation split (``val/loss``
        and ``val/acc`` as the module computes them), save it and make it the checkpoint callback's best so far;
        fine-tuning then starts from the unscaled head. Every rank takes part (gather, checkpoint barrier) at
        ``on_train_start``, which every rank reaches once, in the same order.

        Why the scale: the head is the logistic regression of the hard labels (its decisions), but ``val/loss`` is
        the label-smoothed cross-entropy the network is trained on, which punishes a confident head that is right;
        scaled to the smoothed loss's optimum on its training features, the candidate makes the same decisions and
        competes on the loss the fine-tuned epochs are scored by."""
        callback = trainer.checkpoint_callback
        if callback is None or callback.monitor not in ("val/loss", "val/acc") or callback.save_top_k != 1:
            log.info("linear probe: the probed model is not checkpointed (needs a ModelCheckpoint of save_top_k 1 "
                     "monitoring val/loss or val/acc)")
            return
        if not datamodule.rows_of("val"):
            return
        started = time.monotonic()
        features, labels = _gathered(trainer, *_features(pl_module, datamodule, datamodule.val_dataloader()))
        head = pl_module.net.backbone.get_classifier()
        with torch.no_grad():
            logits = head(features.to(head.weight)).float() * scale
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=_label_smoothing(pl_module))
        self.val_scores = {"val/loss": float(loss), "val/acc": float((logits.argmax(1) == labels).double().mean())}
        path = callback.format_checkpoint_name({})
        fitted = [head.weight.detach().clone(), head.bias.detach().clone()]
        with torch.no_grad():
            head.weight.mul_(scale)
            head.bias.mul_(scale)
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint, like the callback's own
        with torch.no_grad():
            head.weight.copy_(fitted[0])
            head.bias.copy_(fitted[1])
        # The callback's own bookkeeping, as if it had saved this checkpoint: a later validation replaces the file
        # (same name) only when its score is better.
        score = torch.tensor(self.val_scores[callback.monitor])
        callback.best_k_models = {path: score}
        callback.best_model_path = callback.kth_best_model_path = path
        callback.best_model_score = callback.kth_value = score
        log.info("linear probe: the probed model (logits x %.3f) scored val/loss %.4f, val/acc %.4f (%.1f s); saved as "
                 "the best checkpoint so far: fine-tuning replaces it only with better %s", scale,
                 self.val_scores["val/loss"], self.val_scores["val/acc"], time.monotonic() - started, callback.monitor)


def smoothed_loss_scale(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> float:
    """The factor t > 0 for which ``t * logits`` (N, 2) minimise the mean cross-entropy with ``label_smoothing`` on
    ``labels``: the same decisions, at the confidence that loss rewards (1.0 without smoothing: the regression's
    own is the optimum of the unsmoothed loss, up to its penalty)."""
    if label_smoothing <= 0:
        return 1.0
    x = logits.detach().cpu().double()
    y = labels.detach().cpu().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(x * log_t.exp(), y, label_smoothing=label_smoothing)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp())


def _label_smoothing(pl_module: pl.LightningModule) -> float:
    return float(pl_module.hparams.get("label_smoothing", 0.0))


def _gathered(trainer: pl.Trainer, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's features and labels, on every rank (DDP); as they are in one process."""
    if trainer.world_size <= 1:
        return features, labels
    width = features.shape[1]
    features, labels = gather_to_cpu(trainer.strategy, features, labels)
    return features.view(-1, width), labels


def _features(pl_module: pl.LightningModule, datamodule, loader,
              augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's input (pre-logits) of every image of ``loader`` (through the training augmentation when
    ``augment``), the network in eval mode."""
    net = pl_module.net
    head = net.backbone.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UsageError(f"callbacks.linear_probe: the classifier of {type(net.backbone).__name__} is a "
                         f"{type(head).__name__}, not a linear layer; set callbacks.linear_probe.images=0.")
    was_training = net.training
    net.eval()
    outputs, labels = [], []
    try:
        with torch.inference_mode():
            for images, batch_labels in loader:
                images = datamodule.model_input(images.to(pl_module.device), augment=augment)
                outputs.append(pl_module.features(images).float())
                labels.append(batch_labels.to(pl_module.device))
    finally:
        net.train(was_training)
    return torch.cat(outputs).clone(), torch.cat(labels).long().clone()


def fit_logistic_head(features: torch.Tensor, labels: torch.Tensor, l2: float,
                      iterations: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-class linear head (weight (2, D), bias (2,)) whose softmax is the L2-penalised logistic regression of
    ``labels`` (0/1) on ``features``.

    Fitted on standardised features (every feature's scale alike, so one penalty suits all), then folded back to
    the raw features; float64 L-BFGS on the CPU, deterministic: every DDP rank computes the same head from the same
    gathered features.
    """
    x = features.detach().cpu().double()
    y = labels.detach().cpu().double()
    if len(x) == 0 or y.min() == y.max():
        raise UsageError("callbacks.linear_probe needs training images of both classes; set "
                         "callbacks.linear_probe.images higher (or 0 to switch the probe off).")
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w @ w)
        loss.backward()
        return loss

    optimiser.step(closure)
    w_raw = (w.detach() / scale)
    b_raw = b.detach() - (w_raw * mean).sum()
    # softmax over (-s/2, s/2) is sigmoid(s): the binary regression as the two-class head the network has.
    weight = torch.stack([-w_raw / 2, w_raw / 2]).float()
    bias = torch.cat([-b_raw / 2, b_raw / 2]).float()
    return weight, bias
