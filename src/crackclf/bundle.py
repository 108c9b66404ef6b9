"""A trained model as a self-describing bundle: weights plus everything inference needs.

A Lightning checkpoint written by crackclf carries a ``"crackclf"`` entry (:class:`BundleInfo`): backbone name,
image size, normalisation, class names and decision threshold, so inference never needs the training config.
The same entry travels in ONNX ``metadata_props`` and in the metadata of a registered MLflow model.
:func:`load_model` opens any of them: a ``.ckpt``, a ``.onnx``, ``runs:/<run_id>`` or ``models:/<name>/<version>``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from crackclf.errors import CrackclfError, short_error
from crackclf.models.backbone import CrackNet
from crackclf.utils import atomic_write

BUNDLE_KEY = "crackclf"
BUNDLE_VERSION = 1
#: The artifact that ``runs:/<run_id>`` loads (training logs best.ckpt under ``checkpoints/``).
RUN_CHECKPOINT = "checkpoints/best.ckpt"
MODEL_SOURCES = "Give a .ckpt or .onnx file, runs:/<run_id> or models:/<name>/<version>."


class BundleError(CrackclfError, ValueError):
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
    tile_size: int | None = None  # side of the training images in source pixels: the whole-photo tiling window
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
        raise BundleError(f"model {str(path)!r}: no such file. {MODEL_SOURCES}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise BundleError(
            f"model {str(path)!r} is not a readable checkpoint ({short_error(error)})"
        ) from None
    if not isinstance(checkpoint, dict) or BUNDLE_KEY not in checkpoint:
        raise BundleError(
            f"model {str(path)!r} has no crackclf bundle entry; it was not written by crackclf training "
            "(use the best.ckpt of a finished run)."
        )
    info = BundleInfo.from_dict(checkpoint[BUNDLE_KEY])
    network = build_network(info)
    network.load_state_dict(network_state(checkpoint))
    return network.eval(), info


# ---------------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A model ready for inference: the bundle info plus a PyTorch network or an ONNX Runtime session."""

    info: BundleInfo
    model_id: str  # what prediction outputs name the model by: the URI, or the resolved file path
    network: CrackNet | None = None
    onnx: bytes | None = None  # the serialized ONNX model of a .onnx source
    session: Any = None  # its onnxruntime.InferenceSession, created on first use (see onnx_session)


def load_model(source: str | os.PathLike) -> LoadedModel:
    """Load a ``.ckpt`` or ``.onnx`` file, ``runs:/<run_id>[/<artifact>]`` or ``models:/<name>/<version>``.

    ``runs:/<run_id>`` loads the run's ``checkpoints/best.ckpt`` (what training logs); a registered model is loaded
    through the MLflow PyTorch flavour with its bundle info from the MLflow model metadata.
    """
    text = os.fspath(source)
    if text.startswith("runs:/"):
        return _load_run(text)
    if text.startswith("models:/"):
        return _load_registered(text)
    path = Path(text)
    if path.suffix.lower() == ".onnx":
        return load_onnx(path)
    network, info = load_checkpoint(path)
    return LoadedModel(info, str(path.resolve()), network=network)


def _load_run(uri: str) -> LoadedModel:
    from crackclf.tracking import mlflow as tracking

    parts = uri.removeprefix("runs:/").strip("/").split("/", 1)
    run_id, artifact = parts[0], parts[1] if len(parts) > 1 else RUN_CHECKPOINT
    if not run_id:
        raise BundleError(f"model {uri!r}: give the run id, e.g. runs:/0123abcd... (see `make ui`).")
    with tempfile.TemporaryDirectory(prefix="crackclf-model-") as tmp:
        try:
            local = tracking.download_artifact(run_id, artifact, Path(tmp))
        except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing run/artifact
            raise BundleError(
                f"model {uri!r}: cannot download artifact {artifact!r} of run {run_id} from {tracking.tracking_uri()} "
                f"({short_error(error)}). Check the run id and that "
                "MLFLOW_TRACKING_URI points at the store the model was trained with."
            ) from None
        loaded = load_onnx(local) if local.suffix.lower() == ".onnx" else load_model(local)
    loaded.model_id = uri if len(parts) > 1 else f"runs:/{run_id}"
    return loaded


def _load_registered(uri: str) -> LoadedModel:
    from crackclf.tracking import mlflow as tracking

    try:
        network, metadata = tracking.load_pytorch_model(uri)
    except Exception as error:  # noqa: BLE001
        raise BundleError(
            f"model {uri!r}: cannot load it from the registry at {tracking.tracking_uri()} ({short_error(error)}). "
            "Give models:/<name>/<version> of a model registered by training "
            "with register=true."
        ) from None
    if BUNDLE_KEY not in (metadata or {}):
        raise BundleError(f"model {uri!r} has no crackclf bundle in its MLflow metadata; it was not registered by "
                          "crackclf training.")
    info = BundleInfo.from_dict(json.loads(metadata[BUNDLE_KEY]) if isinstance(metadata[BUNDLE_KEY], str)
                                else metadata[BUNDLE_KEY])
    if not isinstance(network, CrackNet):
        raise BundleError(f"model {uri!r} holds a {type(network).__name__}, not a crackclf network.")
    return LoadedModel(info, uri, network=network.eval())


# ------------------------------------------------------------------------------------------------------- ONNX
ONNX_INPUT, ONNX_OUTPUT, ONNX_OPSET = "images", "probabilities", 17


class ProbabilityNet(nn.Module):
    """``CrackNet`` + softmax: the graph that is exported (float RGB [0, 1] NCHW in, class probabilities out)."""

    def __init__(self, network: CrackNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images).softmax(dim=1)


def onnx_bytes(network: CrackNet, info: BundleInfo) -> bytes:
    """The network as an ONNX model (dynamic batch axis) with the bundle info in its ``metadata_props``."""
    import onnx

    if any(p.device.type != "cpu" for p in network.parameters()):
        # A copy on the CPU: the network may be in use on a GPU (a PyTorch predictor sharing the same bundle).
        network = copy.deepcopy(network).cpu()
    buffer = io.BytesIO()
    example = torch.zeros(1, 3, info.image_size, info.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            ProbabilityNet(network).eval(), (example,), buffer, dynamo=False, input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT], dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, {BUNDLE_KEY: json.dumps(info.to_dict())})
    return model.SerializeToString()


def save_onnx(network: CrackNet, info: BundleInfo, path: str | os.PathLike) -> Path:
    """Write the ONNX model atomically."""
    data = onnx_bytes(network, info)
    return atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def _ort_session(model: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One intra-op thread per run; a Predictor uses several cores by running shards of a batch side by side
    # (Predictor threads=). Two intra-op threads that sleep between operators were slower than one even at batch
    # 1 (`make bench-infer`, docs/deployment.md), and idle threads that spin instead burnt more CPU per served
    # request on shared cores (`make bench-serve`, docs/serving.md) and starve the decode threads.
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def load_onnx(path: str | os.PathLike) -> LoadedModel:
    """Read an ``.onnx`` written by crackclf, with its bundle info from the metadata (the ONNX Runtime session is
    created on first use)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"model {str(path)!r}: no such file. {MODEL_SOURCES}")
    data = path.read_bytes()
    try:
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto)
    except Exception as error:  # noqa: BLE001
        raise BundleError(f"model {str(path)!r} is not a readable ONNX model ({short_error(error)})") from None
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    if BUNDLE_KEY not in metadata:
        raise BundleError(f"model {str(path)!r} has no crackclf entry in its ONNX metadata; export it with "
                          "`crackclf export --model <ckpt> --format onnx`.")
    return LoadedModel(BundleInfo.from_dict(json.loads(metadata[BUNDLE_KEY])), str(path.resolve()), onnx=data)


def onnx_session(model: LoadedModel):
    """The model's ONNX Runtime session (one intra-op thread per run; thread-safe), created once; a PyTorch model
    is exported to ONNX in memory first."""
    if model.session is None:
        data = model.onnx if model.onnx is not None else onnx_bytes(model.network, model.info)
        model.session = _ort_session(data)
    return model.session


def source_tile_size(verify_report: dict | None) -> int | None:
    """The training images' usual side in source pixels (the most common size in a ``verify`` report)."""
    sizes = (verify_report or {}).get("sizes") or {}
    if not sizes:
        return None
    width, height = (int(v) for v in max(sizes, key=sizes.get).split("x"))
    return min(width, height)


def log_bundle_model(run_id: str, network: CrackNet, info: BundleInfo, registered_model_name: str | None = None
                     ) -> tuple[str, str | None]:
    """Log the network as an MLflow PyTorch model (signature, input example, bundle info as metadata) and register
    it under ``registered_model_name`` when given. Returns ``(model_uri, version)``."""

    from crackclf.tracking import mlflow as tracking

    network = copy.deepcopy(network).cpu().float().to(memory_format=torch.contiguous_format).eval()
    example = np.random.default_rng(0).random((2, 3, info.image_size, info.image_size), dtype=np.float32)
    return tracking.log_pytorch_model(run_id, network, example, {BUNDLE_KEY: json.dumps(info.to_dict())},
                                      registered_model_name)
