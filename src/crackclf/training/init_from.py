"""Start a training run from the weights of a model crackclf trained before (``init_from=``): fine-tuning or
adapting a deployed model to a new surface instead of starting from ImageNet."""

from __future__ import annotations

import logging
from typing import Any

from crackclf.bundle import BundleError, load_model
from crackclf.errors import UsageError
from crackclf.training.finalize import per_source_metrics

__all__ = ["initialise_from", "score_start"]

log = logging.getLogger(__name__)


def initialise_from(model: Any, source: str, backbone: str, timm_kwargs: dict[str, Any] | None = None) -> str:
    """Load the network weights of ``source`` (a ``.ckpt``, ``runs:/<id>`` or ``models:/<name>/<version>``) into
    ``model.net``; returns the id of the model started from (for the run's ``init_from`` tag).

    The network must be the one the run builds (``backbone``, its timm options, two classes); the head is loaded
    too: the run continues the model's decision, not a fresh one.
    """
    try:
        loaded = load_model(source)
    except BundleError as error:
        raise UsageError(f"init_from={source!r}: {error}") from None
    if loaded.network is None:
        raise UsageError(f"init_from={source!r} is an ONNX model, which holds no trainable weights: give the "
                         "model's .ckpt, runs:/<run_id> or models:/<name>/<version> instead.")
    info = loaded.info
    if info.backbone != backbone or dict(info.timm_kwargs) != dict(timm_kwargs or {}):
        raise UsageError(
            f"init_from={source!r} is a {info.backbone} {dict(info.timm_kwargs) or ''}model but this run builds "
            f"backbone={backbone} {dict(timm_kwargs or {}) or ''}: choose the same backbone (e.g. "
            f"`backbone={info.backbone}`) to start from it.")
    try:
        model.net.load_state_dict(loaded.network.state_dict(), strict=True)
        model.head_trained = True  # callbacks.linear_probe keeps it
    except RuntimeError as error:
        raise UsageError(f"init_from={source!r}: its weights do not fit this run's network "
                         f"({str(error).splitlines()[0][:200]}).") from None
    model.decision_threshold = info.threshold  # what the start model decides with, until this run chooses its own
    log.info("starting from %s (%s, trained at %d px, threshold %.3f)", loaded.model_id, info.backbone,
             info.image_size, info.threshold)
    return loaded.model_id


def score_start(trainer: Any, model: Any, datamodule: Any) -> dict[str, float]:
    """The test scores of the weights a run starts from, before any training, at the start model's threshold:
    ``before/test/acc``, … and per source ``before/test/<source>/acc`` (empty without a test split). The run's
    loggers are detached meanwhile, so that the ``test/*`` metrics hold the trained model's scores only; the caller
    logs these."""
    if not datamodule.rows_of("test"):
        return {}
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        results = {key: float(value) for key, value in trainer.test(model, datamodule=datamodule,
                                                                     verbose=False)[0].items()}
    finally:
        trainer.loggers = loggers
    probabilities, labels = model.test_probabilities()  # per source too: the new surface's "before" on its own
    results |= per_source_metrics(datamodule, "test", probabilities.numpy(), labels.numpy(), model.decision_threshold)
    return {f"before/{key}": value for key, value in results.items()}
