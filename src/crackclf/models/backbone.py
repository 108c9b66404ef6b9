"""timm backbones: name checks, the pretrained-weights policy (sources: crackclf.models.weights) and freezing."""

from __future__ import annotations

import difflib
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from crackclf.errors import CrackclfError, short_error
from crackclf.models.weights import load_local_weights, load_pretrained

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_CHOICES = ("auto", "true", "false")


class BackboneError(CrackclfError, ValueError):
    """A backbone that cannot be built as configured; the message says what to do."""


def check_backbone_name(name: str) -> None:
    """Raise :class:`BackboneError` with close matches from ``timm.list_models`` when ``name`` is unknown."""
    if timm.is_model(name):
        return
    matches = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(matches)}." if matches else ""
    raise BackboneError(
        f"backbone.name={name!r} is not a timm model.{hint} List them with "
        "`python -c \"import timm; print(timm.list_models('*net*'))\"`."
    )


def normalise_pretrained(value: object) -> str:
    """Accept auto/true/false in the spellings YAML produces (bools, strings)."""
    text = str(value).strip().lower()
    if text in ("true", "false", "auto"):
        return text
    raise BackboneError(f"backbone.pretrained={value!r} must be one of auto, true, false.")


@dataclass
class BuiltBackbone:
    """A timm network with a fresh head, what it started from, and how it is frozen during training."""

    model: nn.Module
    pretrained_status: str  # "package:<dist>==<v>", "hub", "local:<file>", "scratch", "scratch (hub unreachable)"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: What rebuilds the architecture without weights (crackclf.bundle stores both): the timm name and the extra
    #: timm keyword arguments (``backbone.kwargs``; dropout is left out: it does not change the weights).
    name: str = ""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Epochs at the start during which only the head trains (``backbone.freeze_epochs``).
    freeze_epochs: int = 0
    #: Parameters frozen for the whole run (``backbone.freeze_groups``) and their BatchNorm layers, which the
    #: LightningModule keeps in eval mode (see :func:`freeze_early_groups`).
    frozen_names: frozenset[str] = frozenset()
    frozen_norms: list[nn.Module] = field(default_factory=list)


def create_backbone(
    name: str,
    pretrained: str | bool,
    *,
    num_classes: int,
    weights: str | None = None,
    drop_rate: float = 0.0,
    kwargs: Mapping[str, Any] | None = None,
    freeze_groups: int = 0,
    freeze_epochs: int = 0,
    freeze_norm_stats: bool = False,
) -> BuiltBackbone:
    """Build ``name`` with a fresh ``num_classes`` head according to the pretrained policy, frozen as asked.

    This is the ``_target_`` of every ``conf/backbone/*.yaml`` (with ``_partial_: true``): Hydra binds the YAML's
    values and the LightningModule adds ``num_classes`` (one per class name). The keyword defaults are timm's
    "off" values (no dropout, nothing frozen, no extra arguments) for calls from Python; the YAML states each one.

    ``pretrained``: ``auto`` uses ImageNet weights when available (an installed weights package, the hub cache or
    the hub: :mod:`crackclf.models.weights`) and otherwise warns loudly and trains from scratch; ``true`` requires
    them; ``false`` never loads them. ``weights`` (a local file) overrides all three. ``kwargs``: extra timm
    ``create_model`` arguments, recorded with the model. ``freeze_groups``: the first N of timm's coarse parameter
    groups stay frozen all run; ``freeze_epochs``: only the head trains for the first N epochs;
    ``freeze_norm_stats``: every BatchNorm layer keeps its pretrained running statistics all run (its scale and shift
    still train), so fine-tuning starts from the very features a linear-probe head was fitted on (ignored, with a
    warning, when no pretrained weights were loaded: a fresh network's statistics mean nothing).
    """
    timm_kwargs = dict(kwargs or {})
    built = _create_network(name, pretrained, weights, dict(num_classes=num_classes, drop_rate=drop_rate,
                                                            **timm_kwargs))
    frozen_names, frozen_norms = freeze_early_groups(built.model, int(freeze_groups or 0))
    if freeze_norm_stats and built.pretrained_status.startswith("scratch"):
        log.warning("backbone.freeze_norm_stats=true ignored: %s starts from scratch (%s), so its BatchNorm layers "
                    "have no statistics to keep; they learn them as usual", name, built.pretrained_status)
    elif freeze_norm_stats:
        frozen_norms = batch_norms(built.model)
    built.name, built.timm_kwargs, built.freeze_epochs = name, timm_kwargs, int(freeze_epochs or 0)
    built.frozen_names, built.frozen_norms = frozen_names, frozen_norms
    return built


def _create_network(name: str, pretrained: str | bool, weights: str | None, kwargs: dict[str, Any]) -> BuiltBackbone:
    """The network alone, from a local file, the pretrained sources or scratch (see :func:`create_backbone`)."""
    check_backbone_name(name)
    policy = normalise_pretrained(pretrained)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"backbone.weights={weights!r}: no such file. Give the path of a saved state dict.")
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_local_weights(model, path)
        status = f"local:{path.name}"
    elif policy == "false":
        model, status = timm.create_model(name, pretrained=False, **kwargs), "scratch"
    else:
        try:
            model, status = load_pretrained(name, kwargs)
        except ConnectionError as error:
            if policy == "true":
                raise BackboneError(
                    f"backbone.pretrained=true but the weights of {name!r} could not be loaded "
                    f"({short_error(error, 300)}). Offline, either download them elsewhere and pass "
                    "backbone.weights=/path/to/file.pth (or .safetensors), or set backbone.pretrained=false "
                    "(or auto) to train from scratch."
                ) from None
            message = (
                f"PRETRAINED WEIGHTS FOR {name!r} ARE NOT REACHABLE ({error}); TRAINING FROM SCRATCH. "
                "Set backbone.pretrained=true to make this an error, or backbone.weights=<file> to use a local copy."
            )
            warnings.warn(message, stacklevel=3)  # at the caller of create_backbone
            log.warning(message)
            model, status = timm.create_model(name, pretrained=False, **kwargs), "scratch (hub unreachable)"
    config = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(config.get("mean", IMAGENET_MEAN))
    std = tuple(config.get("std", IMAGENET_STD))
    return BuiltBackbone(model, status, mean, std)


def set_backbone_trainable(model: nn.Module, trainable: bool, keep_frozen: frozenset[str] = frozenset()) -> None:
    """Freeze or unfreeze everything except the classifier head (for linear probing); parameters named in
    ``keep_frozen`` (see :func:`freeze_early_groups`) stay frozen either way."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for name, parameter in model.named_parameters():
        if id(parameter) not in head:
            parameter.requires_grad_(trainable and name not in keep_frozen)


def freeze_early_groups(model: nn.Module, groups: int) -> tuple[frozenset[str], list[nn.Module]]:
    """Freeze, for the whole run, the first ``groups`` of timm's coarse parameter groups (0: the stem, then one per
    stage), and return their parameter names and their BatchNorm layers, which the caller keeps in eval mode.

    The early stages of an ImageNet network detect edges and textures that a crack needs too; not training them
    saves most of the backward pass on a CPU, and their running statistics stay ImageNet's instead of drifting with
    small batches of one data set."""
    if groups <= 0:
        return frozenset(), []
    from timm.models import group_parameters

    try:
        grouped = group_parameters(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        raise BackboneError(f"backbone.freeze_groups={groups}: {type(model).__name__} does not declare timm's "
                            "parameter groups; use freeze_groups: 0.") from None
    order = sorted(grouped)
    if groups >= len(order):
        raise BackboneError(f"backbone.freeze_groups={groups} would freeze all {len(order)} parameter groups of "
                            f"{type(model).__name__} (stem, stages, head); use at most {len(order) - 1}.")
    names = frozenset(name for group in order[:groups] for name in grouped[group])
    for name, parameter in model.named_parameters():
        if name in names:
            parameter.requires_grad_(False)
    return names, batch_norms(model, lambda prefix, norm: all(f"{prefix}.{n}" in names
                                                              for n, _ in norm.named_parameters()))


def batch_norms(model: nn.Module, keep: Callable[[str, nn.Module], bool] | None = None) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` (those for which ``keep(name, layer)`` holds, when given)."""
    return [module for prefix, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (keep is None or keep(prefix, module))]


class CrackNet(nn.Module):
    """A backbone with its input normalisation inside, so callers feed float RGB in [0, 1], NCHW."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the classifier head sees (timm's pre-logits: pooled features), for images as :meth:`forward` takes."""
        backbone = self.backbone
        return backbone.forward_head(backbone.forward_features((images - self.mean) / self.std), pre_logits=True)
