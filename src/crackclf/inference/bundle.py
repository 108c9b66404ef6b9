"""A trained model as a self-describing bundle: weights plus everything inference needs.

A Lightning checkpoint written by crackclf carries a ``"crackclf"`` entry (:class:`BundleInfo`): backbone name,
image size, normalisation, class names and decision threshold, so inference never needs the training config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from crackclf.models.backbone import CrackNet
from crackclf.utils import atomic_write

BUNDLE_KEY = "crackclf"
BUNDLE_VERSION = 1


class BundleError(ValueError):
    """A model source that cannot be loaded; the message names it and says what was expected."""


@dataclass
class BundleInfo:
    """What travels with the weights."""

    backbone: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, str] = ("no_crack", "crack")
    threshold: float = 0.5
    run_id: str | None = None
    pretrained_status: str = ""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    version: int = BUNDLE_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std", "class_names"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("mean", "std", "class_names"):
            data[key] = list(data[key])
        return data


def build_network(info: BundleInfo) -> CrackNet:
    """An untrained network of the bundle's architecture (no hub access)."""
    backbone = timm.create_model(info.backbone, pretrained=False, num_classes=len(info.class_names),
                                 **info.timm_kwargs)
    return CrackNet(backbone, info.mean, info.std)


def write_bundle_info(checkpoint_path: Path, info: BundleInfo) -> None:
    """Add (or replace) the bundle entry of a Lightning checkpoint, atomically."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    checkpoint[BUNDLE_KEY] = info.to_dict()
    atomic_write(Path(checkpoint_path), lambda tmp: torch.save(checkpoint, tmp))


def network_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``CrackNet`` weights inside a Lightning checkpoint (the module's ``net.`` sub-tree)."""
    state = checkpoint.get("state_dict", {})
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def load_checkpoint(path: str | Path) -> tuple[CrackNet, BundleInfo]:
    """Load a crackclf checkpoint into an eval-mode network on the CPU, with its bundle info."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"model {str(path)!r}: no such file. Give a .ckpt, a .onnx, runs:/<id> or models:/<name>/<v>.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise BundleError(f"model {str(path)!r} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or BUNDLE_KEY not in checkpoint:
        raise BundleError(
            f"model {str(path)!r} has no crackclf bundle entry; it was not written by crackclf training "
            "(use the best.ckpt of a finished run)."
        )
    info = BundleInfo.from_dict(checkpoint[BUNDLE_KEY])
    network = build_network(info)
    network.load_state_dict(network_state(checkpoint))
    return network.eval(), info
