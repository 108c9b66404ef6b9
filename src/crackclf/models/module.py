"""LightningModule: a timm backbone with a 2-class head, cross-entropy, torchmetrics per stage and the
generalisation gap."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric, SumMetric

from crackclf.distributed import gather_to_cpu
from crackclf.errors import UsageError
from crackclf.metrics import stage_metrics
from crackclf.models.backbone import BuiltBackbone, CrackNet, set_backbone_trainable
from crackclf.utils import worker_count

log = logging.getLogger(__name__)


class CrackClassifier(pl.LightningModule):
    """Binary crack classifier.

    Every argument but ``scheduler`` comes from the composed config (``conf/train.yaml``'s ``model`` node): the YAML is
    the one place their values are stated, so the constructor gives them no defaults of its own.

    Args:
        backbone: the backbone factory, ``conf/backbone/*.yaml`` instantiated with ``_partial_``
            (:func:`crackclf.models.backbone.create_backbone` with ``name``, ``pretrained``, ``weights``,
            ``freeze_epochs``, ``freeze_groups``, ``drop_rate`` and ``kwargs`` bound); called here with
            ``num_classes``.
        optimizer: a partial optimizer (``params`` still missing), from the ``optimizer`` config group.
        image_size: input side in pixels (recorded with the model).
        class_names: names of class 0 and class 1.
        label_smoothing: cross-entropy label smoothing.
        max_gap: a final train−val accuracy gap (unaugmented training sample vs validation, measured by
            ``crackclf.train`` after fitting) above this flags the run as overfitting.
        channels_last: use the channels-last memory format (faster convolutions on many CPUs and GPUs).
        scheduler: a partial LR-scheduler factory (``optimizer`` and ``total_steps`` still missing); ``None``
            (``scheduler=none``) keeps the rate constant.
    """

    def __init__(
        self,
        backbone: Callable[..., BuiltBackbone],
        optimizer: Callable[..., torch.optim.Optimizer],
        *,
        image_size: int,
        class_names: Sequence[str],
        label_smoothing: float,
        max_gap: float,
        channels_last: bool,
        scheduler: Callable[..., Any] | None = None,
        head_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        # The factories are code, not hyperparameters: what rebuilds the network is the bundle entry
        # (crackclf.bundle.BundleInfo, from backbone_name/timm_kwargs below), and the config is logged to MLflow.
        self.save_hyperparameters(logger=False, ignore=["backbone", "optimizer", "scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        if head_lr_scale <= 0:
            raise UsageError(f"model.head_lr_scale={head_lr_scale} must be > 0: the classifier head's learning rate "
                             "as a multiple of the optimizer's (1: the same).")
        self.head_lr_scale = float(head_lr_scale)
        built = backbone(num_classes=len(class_names))
        self.pretrained_status = built.pretrained_status
        self.backbone_name, self.timm_kwargs = built.name, dict(built.timm_kwargs)
        self.net = CrackNet(built.model, built.mean, built.std)
        self.freeze_epochs = built.freeze_epochs
        self._frozen_names, self._frozen_norms = built.frozen_names, built.frozen_norms
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.decision_threshold = 0.5
        #: The classifier head holds a trained model's decision (``init_from``), not a fresh initialisation.
        self.head_trained = False
        self.train_metrics = stage_metrics("train")
        self.train_loss = MeanMetric()  # the epoch's training loss, weighted by batch size (see on_train_epoch_end)
        self.train_throughput = SumMetric()  # images per second of each rank, summed: the whole job's throughput
        self.val_metrics = stage_metrics("val")
        self.test_metrics = stage_metrics("test")
        self.val_acc_best = MaxMetric()
        self.last_val_acc: float | None = None
        self.history: list[dict[str, float]] = []  # per-epoch metrics, for plots without re-reading MLflow
        self.val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.val_outputs_epoch: int | None = None  # the fit epoch whose validation pass filled val_outputs
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_sample_losses: torch.Tensor | None = None
        # This epoch's training outputs so far (probabilities, labels, summed loss): a checkpoint taken mid-epoch
        # (Ctrl-C, SIGTERM) carries them, so the resumed epoch's train/* cover the whole epoch (see on_load_checkpoint).
        self._epoch_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # Set again at each epoch start; here too, because a run resumed mid-epoch skips that hook.
        self._train_started, self._train_images, self._train_elapsed = time.perf_counter(), 0, 0.0

    # ----------------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer.world_size > 1 and trainer.strategy.root_device.type == "cpu":
            # CPU data parallel (trainer=cpu_ddp): each process gets its share of the usable cores. Lightning's own
            # choice divides os.cpu_count(), which counts the host's cores inside a container limited to fewer.
            torch.set_num_threads(max(1, worker_count() // max(1, trainer.num_devices)))
            # Every rank was seeded alike; the batch augmentation draws from the global RNG, so give each rank its
            # own stream (else the same flips and jitter would be drawn for the different images of each rank).
            if trainer.global_rank:
                torch.manual_seed(torch.initial_seed() + trainer.global_rank)

    # ---------------------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self._in_layout(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier head's input for ``images`` (float RGB in [0, 1], NCHW): see :meth:`CrackNet.features`."""
        return self.net.features(self._in_layout(images))

    def _in_layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        losses = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing, reduction="none")
        self.last_sample_losses = losses.detach()  # per image, for crackclf.training.focus
        probabilities = logits.float().softmax(dim=1)[:, 1]
        return losses.mean(), probabilities.detach(), labels

    # ---------------------------------------------------------------------------------------------------- train
    def on_train_epoch_start(self) -> None:
        # Throughput clock: training batches only (validation runs before on_train_epoch_end, so it is excluded).
        self._train_started, self._train_images, self._train_elapsed = time.perf_counter(), 0, 0.0
        if self.freeze_epochs:
            trainable = self.current_epoch >= self.freeze_epochs
            set_backbone_trainable(self.net.backbone, trainable, self._frozen_names)
            if self.current_epoch in (0, self.freeze_epochs):
                log.info("epoch %d: backbone %s", self.current_epoch, "unfrozen" if trainable else "frozen")

    def on_train_batch_start(self, batch: Any, batch_index: int) -> None:
        # Frozen early stages keep their ImageNet BatchNorm statistics: Lightning switches the whole module to train
        # mode around validation, so put them back every batch (a handful of modules: no measurable cost).
        for norm in self._frozen_norms:
            norm.eval()

    def training_step(self, batch, batch_index: int) -> torch.Tensor:
        loss, probabilities, labels = self._step(batch)
        self.train_metrics.update(probabilities, labels)
        self.train_loss.update(loss.detach(), weight=len(labels))
        self._epoch_outputs.append((probabilities, labels.detach(), loss.detach() * len(labels)))
        # The bar shows this rank's running loss: a step value, never reduced (see on_train_epoch_end for why the
        # epoch value is not logged here with sync_dist).
        self.log("loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False)
        self._train_images += len(labels)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_index: int) -> None:
        self._train_elapsed = time.perf_counter() - self._train_started

    def on_train_epoch_end(self) -> None:
        # DDP rule, for every collective of this project (reductions, gathers, broadcasts): issue it only where
        # every rank is at the same point with the same collectives behind it. Lightning reduces a value logged
        # with an epoch-level ``sync_dist=True`` lazily, in the first hook that reads the epoch's metrics; on rank
        # zero that is the progress bar's on_train_epoch_end, which the other ranks skip (their bar is off), so any
        # collective after it (torchmetrics' sync below, a callback's broadcast) pairs with a different one on the
        # other ranks and they wait for each other forever. Hence: nothing is logged from training_step with an
        # epoch-level sync; the epoch's values come from metric objects whose compute() syncs here, on every rank,
        # and _record_history reads them back here on every rank; callbacks communicate at on_train_epoch_start or
        # on_validation_epoch_end (crackclf.training.budget, crackclf.training.focus), never at on_train_epoch_end.
        if self._train_images == 0:  # no training batch in this epoch (resumed at its very end): nothing to report
            return
        if self._train_elapsed > 0:
            self.train_throughput.update(self._train_images / self._train_elapsed)
        values = {**self.train_metrics.compute(), "train/loss": self.train_loss.compute()}
        throughput = self.train_throughput.compute() if self.train_throughput.update_count else None
        for metric in (self.train_metrics, self.train_loss, self.train_throughput):
            metric.reset()
        self._epoch_outputs = []
        # The values are already the same on every rank; sync_dist only tells Lightning so (a mean of equal values),
        # and _record_history below computes that reduction on every rank, in this hook.
        self.log_dict(values, sync_dist=True)
        if self.last_val_acc is not None:
            self.log("train/gap", float(values["train/acc"]) - self.last_val_acc, sync_dist=True)
        if throughput is not None:
            self.log("train/images_per_s", throughput, sync_dist=True)
        self._record_history()
        latest = self.history[-1]
        log.info("epoch %d: train/acc %.4f  val/acc %s  val/loss %s", self.current_epoch, latest.get("train/acc", 0),
                 f"{latest['val/acc']:.4f}" if "val/acc" in latest else "-",
                 f"{latest['val/loss']:.4f}" if "val/loss" in latest else "-")

    # ----------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.val_outputs = []
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        self.val_outputs_epoch = self.current_epoch if fitting else None

    def validation_step(self, batch, batch_index: int) -> None:
        loss, probabilities, labels = self._step(batch)
        self.val_metrics.update(probabilities, labels)
        self.val_outputs.append((probabilities.cpu(), labels.cpu()))
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels),
                 sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        accuracy = values.pop("val/acc")
        self.log("val/acc", accuracy, prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.last_val_acc = float(accuracy)
            self.val_acc_best(accuracy)
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def validation_probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Crack probabilities and labels of the last validation pass."""
        return self._gathered(self.val_outputs)

    def test_probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Crack probabilities and labels of the last test pass (for the confusion matrix, without a second pass)."""
        return self._gathered(self.test_outputs)

    def _gathered(self, outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.cat([p for p, _ in outputs]) if outputs else torch.empty(0)
        labels = torch.cat([y for _, y in outputs]) if outputs else torch.empty(0, dtype=torch.long)
        if self.trainer is not None and self.trainer.world_size > 1:  # DDP: each rank holds only its shard
            probabilities, labels = gather_to_cpu(self.trainer.strategy, probabilities, labels)
        return probabilities, labels

    # ---------------------------------------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        self.test_metrics = stage_metrics("test", self.decision_threshold).to(self.device)
        self.test_outputs = []

    def test_step(self, batch, batch_index: int) -> None:
        loss, probabilities, labels = self._step(batch)
        self.test_metrics.update(probabilities, labels)
        self.test_outputs.append((probabilities.cpu(), labels.cpu()))
        self.log("test/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        self.log_dict(values, sync_dist=True)

    # ------------------------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self._parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        if _is_plateau(self.scheduler_factory):
            scheduler = self.scheduler_factory(optimizer=optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The network's parameters; with ``head_lr_scale`` != 1 the new classifier head is a group of its own at that
        multiple of the optimizer's learning rate (a fresh head on pretrained features learns faster at a higher
        rate than the features should move). The schedulers scale every group alike."""
        head = {id(p) for p in self.net.backbone.get_classifier().parameters()}
        if self.head_lr_scale == 1.0 or not head:  # one group in the parameters' own order, as checkpoints hold it
            return [{"params": list(self.parameters())}]
        body = [p for p in self.parameters() if id(p) not in head]
        base_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if base_lr is None:
            raise UsageError("model.head_lr_scale needs an optimizer with an lr setting (optimizer.lr).")
        return [{"params": body}, {"params": [p for p in self.parameters() if id(p) in head],
                                   "lr": base_lr * self.head_lr_scale}]

    # ------------------------------------------------------------------------------------------------- resuming
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what is not in the state dict, so a resumed run has the whole history and the right best value,
        and the training outputs of the epoch so far (empty at an epoch's start)."""
        best = self.val_acc_best.max_value.item() if self.val_acc_best.update_count else None
        state = {"history": self.history, "last_val_acc": self.last_val_acc, "val_acc_best": best}
        if self._epoch_outputs:
            state["epoch_so_far"] = {
                "probabilities": torch.cat([p for p, _, _ in self._epoch_outputs]).float().cpu(),
                "labels": torch.cat([y for _, y, _ in self._epoch_outputs]).to(torch.uint8).cpu(),
                "loss_sum": float(sum(s.item() for _, _, s in self._epoch_outputs)),
            }
        checkpoint["crackclf_module"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("crackclf_module")
        if state:
            self.history, self.last_val_acc = list(state["history"]), state["last_val_acc"]
            if state["val_acc_best"] is not None:
                self.val_acc_best.update(torch.tensor(state["val_acc_best"]))
            if state.get("epoch_so_far"):
                self._replay_epoch_so_far(state["epoch_so_far"])

    def _replay_epoch_so_far(self, so_far: dict[str, Any]) -> None:
        """Put the training outputs of a checkpoint taken mid-epoch back into the epoch's metrics: the epoch's train/*
        then cover its batches before the stop too, and an epoch resumed after its last batch (a stop during its
        validation) still reports them. Under DDP the checkpoint is rank zero's: every rank replays it (the same
        path on every rank, so that the epoch end's sync pairs up), so rank zero's part before the stop counts once
        per rank there; one process is exact."""
        probabilities = so_far["probabilities"].to(self.device)
        labels = so_far["labels"].to(self.device, torch.long)
        count = len(labels)
        self.train_metrics.update(probabilities, labels)
        self.train_loss.update(torch.tensor(so_far["loss_sum"] / count, device=self.device), weight=count)
        self._epoch_outputs = [(probabilities, labels, torch.tensor(so_far["loss_sum"], device=self.device))]
        self._train_images = count

    # ------------------------------------------------------------------------------------------------- helpers
    def _record_history(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        metrics["epoch"] = self.current_epoch
        self.history.append(metrics)


def _is_plateau(factory: Callable) -> bool:
    target = getattr(factory, "func", factory)
    return isinstance(target, type) and issubclass(target, torch.optim.lr_scheduler.ReduceLROnPlateau)
