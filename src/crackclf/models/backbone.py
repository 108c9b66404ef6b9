"""timm backbones: name checks, the pretrained-weights policy, local weight files and freezing."""

from __future__ import annotations

import difflib
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_CHOICES = ("auto", "true", "false")


class BackboneError(ValueError):
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
    model: nn.Module
    pretrained_status: str  # "hub", "local:<file>", "scratch", "scratch (hub unreachable)"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def create_backbone(
    name: str,
    pretrained: str | bool = "auto",
    weights: str | None = None,
    num_classes: int = 2,
    drop_rate: float = 0.0,
    **timm_kwargs,
) -> BuiltBackbone:
    """Build ``name`` with a fresh ``num_classes`` head according to the pretrained policy.

    ``pretrained``: ``auto`` uses hub/cached weights when reachable and otherwise warns loudly and trains from
    scratch; ``true`` requires them; ``false`` never loads them. ``weights`` (a local file) overrides all three.
    """
    check_backbone_name(name)
    policy = normalise_pretrained(pretrained)
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate, **timm_kwargs)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"backbone.weights={weights!r}: no such file. Give the path of a saved state dict.")
        model = timm.create_model(name, pretrained=False, **kwargs)
        _load_local_weights(model, path)
        status = f"local:{path.name}"
    elif policy == "false":
        model, status = timm.create_model(name, pretrained=False, **kwargs), "scratch"
    else:
        try:
            model, status = _create_pretrained(name, kwargs), "hub"
        except Exception as error:  # noqa: BLE001 - any download failure means "not reachable"
            if policy == "true":
                raise BackboneError(
                    f"backbone.pretrained=true but the weights of {name!r} could not be loaded ({type(error).__name__}:"
                    f" {str(error).splitlines()[0][:200]}). Offline, either download them elsewhere and pass "
                    "backbone.weights=/path/to/file.pth (or .safetensors), or set backbone.pretrained=false "
                    "(or auto) to train from scratch."
                ) from None
            message = (
                f"PRETRAINED WEIGHTS FOR {name!r} ARE NOT REACHABLE ({type(error).__name__}); TRAINING FROM SCRATCH. "
                "Set backbone.pretrained=true to make this an error, or backbone.weights=<file> to use a local copy."
            )
            warnings.warn(message, stacklevel=2)
            log.warning(message)
            model, status = timm.create_model(name, pretrained=False, **kwargs), "scratch (hub unreachable)"
    config = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(config.get("mean", IMAGENET_MEAN))
    std = tuple(config.get("std", IMAGENET_STD))
    return BuiltBackbone(model, status, mean, std)


HUB_HOST = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine learns in seconds, not after a long HTTP timeout."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _create_pretrained(name: str, kwargs: dict) -> nn.Module:
    """Pretrained weights from the local Hugging Face cache if present, else from the hub when it is reachable."""
    from huggingface_hub import constants as hub_constants

    offline = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True  # first look in the cache only: no network retries
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception:  # noqa: BLE001 - not cached: fall through to the network
        pass
    finally:
        hub_constants.HF_HUB_OFFLINE = offline
    if offline or not hub_reachable():
        raise ConnectionError(f"no cached weights for {name!r} and {HUB_HOST} is not reachable")
    return timm.create_model(name, pretrained=True, **kwargs)


def _load_local_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict from ``.pth``/``.pt``/``.bin``/``.safetensors``, skipping a classifier of another shape."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise BackboneError(f"backbone.weights={str(path)!r} is not a readable weights file ({error}).") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) // 2:
        raise BackboneError(
            f"backbone.weights={str(path)!r} matches only {len(usable)} of {len(own)} tensors of "
            f"{type(model).__name__};"
            " is it for another architecture?"
        )
    model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    if skipped:
        log.info("local weights: %d tensors kept at initialisation (new head): %s", len(skipped), skipped[:4])


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything except the classifier head (for linear probing)."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for parameter in model.parameters():
        if id(parameter) not in head:
            parameter.requires_grad_(trainable)


class CrackNet(nn.Module):
    """A backbone with its input normalisation inside, so callers feed float RGB in [0, 1], NCHW."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)
