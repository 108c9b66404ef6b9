"""Checks on the composed training config, run before any data is read, with messages that say the fix."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from crackclf.data.images import IMAGE_EXTENSIONS, iter_image_files
from crackclf.errors import CrackclfError

# timm (torch, torchvision) and MLflow are imported where needed: a wrong override or path is then reported in
# about a second instead of after the many seconds those imports take.


class ConfigError(CrackclfError, ValueError):
    """A configuration that cannot train; the message names the key and the fix."""


def _tracking_uri() -> str:
    from crackclf.tracking.mlflow import tracking_uri

    return tracking_uri()


def cpu_data_parallel_devices(max_ranks: int = 2) -> int:
    """Trainer ``devices`` for ``trainer=cpu_ddp``: 1 where PyTorch sees a GPU (one GPU trains alone); on CPU, one
    process per usable core, at most ``max_ranks``.

    Why processes, not threads: lcnet_050's small depthwise convolutions, BatchNorm and activations parallelise
    poorly over intra-op threads, so on 2 cores two 1-thread processes trained faster than one 2-thread process
    (the training-step table of docs/recipe.md; ``make bench-data`` times a training step).
    """
    import torch  # here, not at module level: config checks must stay fast

    from crackclf.utils import worker_count

    if torch.cuda.is_available():
        return 1
    return max(1, min(int(max_ranks), worker_count()))


#: The project's OmegaConf resolvers, by the name the YAML uses: ``${tracking_uri:}`` (conf/logger/mlflow.yaml) and
#: ``${cpu_ranks:N}`` (conf/trainer/cpu_ddp.yaml).
RESOLVERS = {"tracking_uri": _tracking_uri, "cpu_ranks": cpu_data_parallel_devices}


def register_resolvers() -> None:
    """Register the project's resolvers: ``${tracking_uri:}`` resolves to the MLflow store (see
    :mod:`crackclf.tracking.mlflow`), ``${cpu_ranks:N}`` to :func:`cpu_data_parallel_devices`.

    Called by whatever composes the training config: the training entry (``crackclf.train.hydra_main``),
    :func:`compose_config`, the tests' compose helpers. Importing this module registers nothing (no import side
    effect); calling this again is harmless."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _number(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key)
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        f"{key}={value!r} must be a number.",
    )
    return value


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first problem found; cheap checks first, no data is read."""
    freeze = cfg.backbone.get("freeze_epochs", 0) or 0
    _require(isinstance(freeze, int) and freeze >= 0, f"backbone.freeze_epochs={freeze!r} must be an integer >= 0.")
    frozen_groups = cfg.backbone.get("freeze_groups", 0) or 0
    _require(isinstance(frozen_groups, int) and frozen_groups >= 0,
             f"backbone.freeze_groups={frozen_groups!r} must be an integer >= 0 (0: train every stage).")

    lr = _number(cfg, "optimizer.lr")
    _require(lr > 0, f"optimizer.lr={lr} must be > 0 (typical: 1e-4 to 1e-1), e.g. optimizer.lr=0.003.")
    weight_decay = cfg.optimizer.get("weight_decay", 0) or 0
    _require(weight_decay >= 0, f"optimizer.weight_decay={weight_decay} must be >= 0.")

    data = cfg.data
    size = _number(cfg, "data.image_size")
    _require(isinstance(size, int) and 16 <= size <= 1024,
             f"data.image_size={size} must be an integer between 16 and 1024 pixels, e.g. data.image_size=64.")
    batch = _number(cfg, "data.batch_size")
    _require(isinstance(batch, int) and batch >= 1, f"data.batch_size={batch} must be an integer >= 1.")
    workers = _number(cfg, "data.num_workers")
    _require(isinstance(workers, int) and workers >= 0, f"data.num_workers={workers} must be an integer >= 0.")
    val, test = _number(cfg, "data.val_fraction"), _number(cfg, "data.test_fraction")
    _require(0 < val < 1, f"data.val_fraction={val} must be between 0 and 1 (exclusive), e.g. 0.15.")
    _require(0 <= test < 1, f"data.test_fraction={test} must be in [0, 1), e.g. 0.15.")
    _require(val + test < 0.9, f"data.val_fraction + data.test_fraction = {val + test} leaves too little to train on.")
    max_per_class = data.get("max_per_class")
    _require(max_per_class is None or (isinstance(max_per_class, int) and max_per_class >= 10),
             f"data.max_per_class={max_per_class!r} must be null (all images) or an integer >= 10.")
    _require(len(data.class_dirs) == 2, f"data.class_dirs={list(data.class_dirs)} must name exactly two folders.")
    sources = data.get("sources")
    if sources is not None:
        _check_sources(data, sources)
    elif data.get("root") is not None:
        _check_data_folder(Path(str(data.root)), list(data.class_dirs), "data.root")
    if data.get("test_root") is not None:
        _check_data_folder(Path(str(data.test_root)), list(data.class_dirs), "data.test_root")
    if data.get("split_file") is not None:
        _require(Path(data.split_file).is_file(), f"data.split_file={data.split_file} does not exist.")

    start = cfg.get("init_from")
    if start and not str(start).startswith(("runs:/", "models:/")):
        _require(Path(str(start)).is_file(), f"init_from={start} is not a file: give the .ckpt of a trained model "
                 "(e.g. outputs/<date>/<time>/checkpoints/best.ckpt), runs:/<run_id> or models:/<name>/<version>.")

    epochs = cfg.trainer.get("max_epochs")
    _require(epochs is None or (isinstance(epochs, int) and (epochs >= 1 or epochs == -1)),
             f"trainer.max_epochs={epochs!r} must be an integer >= 1.")
    _check_sampler_kept(cfg.trainer)
    smoothing = _number(cfg, "model.label_smoothing")
    _require(0 <= smoothing < 0.5, f"model.label_smoothing={smoothing} must be in [0, 0.5).")
    stopping = OmegaConf.select(cfg, "callbacks.early_stopping")
    if stopping is not None:
        patience = stopping.get("patience")
        _require(isinstance(patience, int) and patience >= 0,
                 f"callbacks.early_stopping.patience={patience!r} must be an integer >= 0.")
    threshold = cfg.get("threshold")
    if threshold is not None:
        # crackclf.metrics.THRESHOLD_MODES, spelled out: importing it loads torchmetrics before a mistake is refused.
        _require(threshold.mode in ("f1", "recall", "balanced"),
                 f"threshold.mode={threshold.mode!r} must be 'f1', 'recall' or 'balanced'.")
        _require(0 < threshold.target_recall <= 1,
                 f"threshold.target_recall={threshold.target_recall} must be in (0, 1].")
        _require(not threshold.get("source") or bool(OmegaConf.select(cfg, "data.sources")),
                 f"threshold.source={threshold.get('source')} names a source of data.sources, but this run has "
                 "none (one folder, data.root): unset it.")

    from crackclf.models.backbone import BackboneError, check_backbone_name, normalise_pretrained

    try:  # last: it needs timm's model list
        check_backbone_name(cfg.backbone.name)
        normalise_pretrained(cfg.backbone.get("pretrained", "auto"))
    except BackboneError as error:
        raise ConfigError(str(error)) from None


def _check_sources(data: DictConfig, sources: object) -> None:
    """``data.sources``: a list of folders (or mappings) that exist and have their class folders; no ``data.root``,
    ``data.split_file`` or ``data.test_root`` beside it (each source is split by itself)."""
    from crackclf.data.prepare import parse_sources
    from crackclf.errors import UsageError

    _require(OmegaConf.is_list(sources) or isinstance(sources, list), (
        f"data.sources={sources!r} must be a list, e.g. 'data.sources=[{{root: /data/a}}, {{root: /data/b}}]'."))
    for key in ("root", "split_file", "test_root"):
        _require(data.get(key) is None, (
            f"data.{key}={data.get(key)} and data.sources are both set: with data.sources every folder is listed "
            f"there and split by itself. Unset data.{key} (data.{key}=null) or data.sources."))
    entries = OmegaConf.to_container(sources, resolve=True) if OmegaConf.is_list(sources) else sources
    try:
        parsed = parse_sources(entries, list(data.class_dirs))
    except UsageError as error:
        raise ConfigError(str(error)) from None
    for index, source in enumerate(parsed):
        if source.root is not None:  # None: the reference data set, downloaded
            _check_data_folder(source.root, list(source.class_dirs), f"data.sources[{index}].root")


def _several_devices(devices: object) -> bool:
    """Whether a Trainer ``devices`` value asks for more than one process (``-1``: every GPU; ``"0,1"``: two)."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices) > 1
    text = str(devices).strip()
    if text.lstrip("-").isdigit():
        return int(text) > 1 or int(text) == -1
    return "," in text.strip(",")  # "auto" is one device on CPU; a multi-GPU "auto" needs a ddp strategy (below)


def _check_sampler_kept(trainer: DictConfig) -> None:
    """Refuse a multi-process trainer that lets Lightning replace the datamodule's sampler.

    The datamodule shards its own whole-batch, resume-exact, focusable sampler per rank; Lightning's distributed
    sampler replacement cannot rebuild it, so such a run would lose those guarantees (or fail inside Lightning).
    """
    replaced = trainer.get("use_distributed_sampler", True)  # Lightning's default is true
    devices, strategy = trainer.get("devices", 1), str(trainer.get("strategy", "auto") or "auto")
    distributed = _several_devices(devices) or "ddp" in strategy.lower()
    _require(not (replaced and distributed), (
        f"trainer.use_distributed_sampler={str(replaced).lower()} with trainer.devices={devices} and "
        f"trainer.strategy={strategy}: Lightning would replace the datamodule's own per-rank sampler (resume-exact "
        "batches, hard-example focus). Set trainer.use_distributed_sampler=false, or use trainer=ddp or "
        "trainer=cpu_ddp, which set it."
    ))


def _check_data_folder(root: Path, class_dirs: list[str], key: str) -> None:
    _require(root.is_dir(), (
        f"{key}={root} is not a folder. Point {key} at a folder with the sub-folders {class_dirs} "
        "(e.g. the extracted Özgenel data set), or leave data.root unset to download it."
    ))
    for class_dir in class_dirs:
        folder = root / class_dir
        _require(folder.is_dir(), (
            f"{key}={root} has no sub-folder {class_dir!r} (found: {sorted(p.name for p in root.iterdir())[:10]}). "
            f"Set data.class_dirs to the two class folder names, negative class first."
        ))
        has_image = next(iter_image_files(folder, folders=False), None) is not None  # stops at the first
        _require(has_image, f"class folder {folder} contains no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")


# ------------------------------------------------------------------------------------ command-line overrides
def compose_config(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False) -> DictConfig:
    """The training config as ``python train.py <overrides>`` composes it, for scripts that start no Hydra run."""
    from hydra import compose, initialize_config_dir

    from crackclf.utils import config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def check_overrides(overrides: list[str], config_dir: Path) -> None:
    """Check ``key=value`` overrides against the config tree before Hydra composes it.

    Hydra's own errors for a misspelt key or group option do not say what the valid ones are; these do. Only
    what can be checked cheaply is checked (appended ``+key``, deleted ``~key`` and ``hydra.*`` are left to Hydra).

    Raises:
        ConfigError: naming the override, the valid keys or options of that group, and close matches.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # a syntax error: Hydra reports it with the position of the mistake
    groups = {p.name for p in config_dir.iterdir() if p.is_dir()}
    chosen: list[str] = []
    values = []
    for override in parsed:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or override.is_force_add() or key.split(".")[0] == "hydra" \
                or key.startswith("hydra/") or override.package is not None:
            continue
        if key in groups:
            options = _group_options(config_dir / key)
            picks = list(override.sweep_string_iterator()) if override.is_sweep_override() else \
                [override.get_value_element_as_str()]
            for pick in picks:
                if pick != "null" and pick not in options:
                    raise ConfigError(_unknown_option(key, pick, options))
            chosen.append(f"{key}={picks[0]}")
        else:
            values.append(key)
    if not values:
        return
    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
            composed = compose(config_name="train", overrides=chosen)
    except HydraException:
        return  # e.g. an experiment that needs other overrides: Hydra explains it
    for key in values:
        _check_key(composed, key)


def _group_options(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _unknown_option(group: str, pick: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(pick, options, n=3, cutoff=0.5)
    message = f"{group}={pick}: there is no conf/{group}/{pick}.yaml. Options: {', '.join(options) or '(none)'}."
    if close:
        message += f" Did you mean {group}={close[0]}?"
    if group == "backbone":
        from crackclf.models.backbone import BackboneError, check_backbone_name

        try:
            check_backbone_name(pick)
            message += (f" {pick!r} is a timm model: use it with a backbone file as template, e.g. "
                        f"backbone=resnet18 backbone.name={pick}.")
        except BackboneError as error:
            timm_close = str(error).partition("Close matches:")[2].split(". List")[0].strip()
            if timm_close:
                message += f" Close timm model names (for backbone.name=...): {timm_close}."
    return message


def _check_key(cfg: DictConfig, key: str) -> None:
    import difflib

    node, path = cfg, []
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return  # a list index or a value: Hydra checks these
        if part not in list(node.keys()):  # not `in node`: False for a key whose value is ??? (to be given)
            parent = ".".join(path) or "the top level"
            valid = sorted(str(k) for k in node)
            close = difflib.get_close_matches(part, valid, n=3, cutoff=0.6)
            hint = f" Did you mean {'.'.join([*path, close[0]])}?" if close else ""
            raise ConfigError(
                f"{key}: {parent} has no key {part!r}.{hint} Valid keys of {parent}: {', '.join(valid)}. "
                f"(To add a new key on purpose, write +{key}=...)"
            )
        node = node._get_node(part)  # unresolved: interpolations need not resolve here
        path.append(part)
