"""Shared fixtures: generated crack/no-crack image folders, the shared real data, isolated MLflow stores."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# Sleep, not spin, while waiting at OpenMP barriers: test processes share 2 cores, and spinning torch threads of
# concurrent processes slow each other down by an order of magnitude. Tests of what a user runs drop it again
# (``run_train(..., user_shell=True)``): a user's shell does not set it.
SUITE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
for _key, _value in SUITE_ENV.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CRACKCLF_SHARED_DATA", REPO.parent / "shared" / "data" / "concrete_crack"))


def make_concrete(rng: np.random.Generator, size: int = 96, crack: bool = False) -> Image.Image:
    """A synthetic grey concrete texture; with ``crack=True`` a dark, jagged line crosses it."""
    base = rng.integers(150, 200)
    noise = rng.normal(0, 12, (size, size, 1))
    tint = rng.normal(0, 4, (1, 1, 3))
    pixels = np.clip(base + noise + tint, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if crack:
        draw = ImageDraw.Draw(image)
        x, y = rng.integers(0, size), 0
        points = [(x, y)]
        while y < size:
            x = int(np.clip(x + rng.integers(-6, 7), 0, size - 1))
            y += int(rng.integers(4, 10))
            points.append((x, y))
        draw.line(points, fill=(int(base * 0.3),) * 3, width=int(rng.integers(2, 5)))
    return image


def write_dataset(root: Path, per_class: int = 40, size: int = 96, seed: int = 0,
                  class_dirs: tuple[str, str] = ("Negative", "Positive")) -> Path:
    """Write a two-class JPEG folder tree like the Özgenel data set."""
    rng = np.random.default_rng(seed)
    for label, class_dir in enumerate(class_dirs):
        folder = root / class_dir
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            make_concrete(rng, size, crack=bool(label)).save(folder / f"{index:05d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """40 + 40 generated 96 px JPEGs in Negative/ and Positive/ (session-wide, read-only by convention)."""
    return write_dataset(tmp_path_factory.mktemp("tiny_dataset"))


@pytest.fixture
def shared_data() -> Path:
    """The real Özgenel subset in ../shared (skips the test when absent, e.g. on a fresh clone)."""
    if not (SHARED_DATA / "Positive").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """An isolated SQLite MLflow store for one test (also seen by subprocesses through the environment)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def offline_hub(monkeypatch) -> None:
    """The Hugging Face hub unreachable, as on an offline machine (and CI): pretrained weights come from an installed
    package or the local cache, ``pretrained=auto`` falls back to scratch with its warning, and no test waits on the
    network."""
    from huggingface_hub import constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def check_pretrained_source(policy: object, status: str) -> None:
    """``status`` (the run's ``pretrained`` tag) is what ``backbone.pretrained=policy`` promises offline."""
    policy = str(policy).lower()
    pretrained = status.startswith("package:") or status == "hub"
    if policy == "false":
        assert status == "scratch", status
    elif policy == "true":
        assert pretrained, f"pretrained=true must load ImageNet weights or fail, got {status!r}"
    else:
        assert pretrained or status == "scratch (hub unreachable)", status


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An isolated inventory/split/image cache (``paths.cache_dir`` reads ``CRACKCLF_CACHE``)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CRACKCLF_CACHE", str(path))
    return path


def subprocess_env(env: dict | None = None, user_shell: bool = False) -> dict[str, str]:
    """This process's environment with ``env`` on top; ``user_shell``: without the suite's own settings
    (``SUITE_ENV``), as a user's shell has it."""
    full_env = {**os.environ, **(env or {})}
    if user_shell:
        for key in SUITE_ENV:
            full_env.pop(key, None)
    return full_env


def default_signals() -> None:
    """``preexec_fn`` of training subprocesses: Ctrl-C (SIGINT) as in a user's terminal. A shell that starts a job
    in the background without job control (``nohup make test-all &`` in a script) hands its children SIGINT ignored,
    and Python then never raises KeyboardInterrupt: the Ctrl-C tests would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_train(*overrides: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None,
              user_shell: bool = False) -> subprocess.CompletedProcess:
    """Run ``python train.py`` as a user would, from the repository root unless ``cwd`` is given; ``user_shell``:
    in a user's environment, without the suite's OpenMP setting (``subprocess_env``).

    A run still going after ``timeout`` seconds fails the test, with what it printed: the whole process group is
    killed (DDP's other ranks included), so a hang can never hold CI up.
    """
    full_env = subprocess_env(env, user_shell)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    command = [sys.executable, str(REPO / "train.py"), *overrides]
    process = subprocess.Popen(command, cwd=cwd or REPO, env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_signals)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"train.py {' '.join(overrides)} did not finish in {timeout:.0f} s (killed; a hang?); it printed:"
                    f"\n{(stdout + stderr)[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``crackclf ARGS...`` as a user would (``python -m crackclf.cli``), from the repository root by default."""
    return subprocess.run(
        [sys.executable, "-m", "crackclf.cli", *args], cwd=cwd or REPO, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )



def tiny_fit(dataset: Path, root: Path, callbacks: list, epochs: int, *, image_size: int = 32, batch_size: int = 16,
             lr: float = 1e-2, scheduler=None, ckpt_path: str | None = None, backbone=None):
    """Fit lcnet_050 from scratch (or the ``backbone`` factory given) on ``dataset`` in this process (CPU, no logger,
    no checkpoints unless a callback writes them, e.g. a ``ModelCheckpoint``): the small real training run behind the
    callback tests. Returns
    ``(datamodule, trainer)``."""
    import pytorch_lightning as pl
    import torch

    from crackclf.data.datamodule import CrackDataModule
    from crackclf.models.backbone import create_backbone
    from crackclf.models.module import CrackClassifier

    data = CrackDataModule(str(dataset), image_size=image_size, batch_size=batch_size, cache_dir=str(root / "c"),
                           progress=False, min_per_class=1)
    model = CrackClassifier(backbone or functools.partial(create_backbone, "lcnet_050", pretrained=False),
                            optimizer=lambda params: torch.optim.AdamW(params, lr=lr), scheduler=scheduler,
                            image_size=image_size, class_names=("no_crack", "crack"), label_smoothing=0.05,
                            max_gap=0.003, channels_last=False)
    checkpointing = any(isinstance(callback, pl.callbacks.ModelCheckpoint) for callback in callbacks)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=checkpointing,
                         enable_progress_bar=False, num_sanity_val_steps=0, callbacks=callbacks,
                         default_root_dir=root)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=False)
    return data, trainer

@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory) -> list:
    """The bad-input corpus of tests/corpus.py in its own folder (session-wide, read-only by convention)."""
    from tests.corpus import make_corpus

    return make_corpus(tmp_path_factory.mktemp("bad_corpus"))


@pytest.fixture(scope="session")
def corpus_dataset(tmp_path_factory) -> tuple[Path, list]:
    """A 30 + 30 image class tree whose Positive/ also holds the whole bad-input corpus: (root, corpus items)."""
    from tests.corpus import install_corpus

    root = write_dataset(tmp_path_factory.mktemp("corpus_dataset"), per_class=30, seed=3)
    return root, install_corpus(root, "Positive")


def expected_validation_points(client, run_id: str, epochs: int) -> int:
    """How many ``val/acc`` points a finished run logs: one per epoch, plus the re-validation of the best weights
    after fit unless they are the last epoch's (whose validation pass already scored them). The best epoch is the
    first lowest ``val/loss``, as the checkpoint callback keeps it, unless no epoch beat the linear probe's model
    (``probe/val/loss``, saved as the first best checkpoint): then those weights are re-validated."""
    history = sorted(client.get_metric_history(run_id, "val/loss"), key=lambda m: (m.timestamp, m.step))[:epochs]
    losses = [m.value for m in history]
    probe = client.get_run(run_id).data.metrics.get("probe/val/loss")
    if probe is not None and min(losses) >= probe:  # replaced only by a strictly lower loss
        return epochs + 1
    best = losses.index(min(losses))
    return epochs if best == epochs - 1 else epochs + 1


@dataclass
class ValidationRescore:
    """The validation split of a logged run, scored again in this process by the run's logged model."""
    rows: list
    probabilities: np.ndarray
    labels: np.ndarray


def check_final_gap(client, run, data_root: Path, download_to: Path) -> ValidationRescore:
    """Check a finished run's ``val/acc``, ``train/clean_acc`` and ``train_val_gap`` against what this process
    measures with the run's logged model, not by ``train.py``'s own subtraction: accuracy at 0.5 over the whole
    validation split, and the clean training sample (as many rows as validation) as a count that the training split,
    scored by the same model, allows. Returns the validation scores for further checks."""
    from crackclf.data.prepare import subsample
    from crackclf.data.split import read_split
    from crackclf.inference.predictor import Predictor

    run_id = run.info.run_id
    split_artifact = next(a.path for a in client.list_artifacts(run_id, "data") if a.path.endswith(".csv"))
    rows = read_split(client.download_artifacts(run_id, split_artifact, str(download_to)))
    # The logged split is the whole folder's; a run with data.max_per_class trained on its seeded subsample.
    cap = run.data.params.get("data.max_per_class", "None")
    rows = subsample(rows, None if cap in ("None", "null", "") else int(cap), int(run.data.params["data.seed"]))
    predictor = Predictor.load(f"runs:/{run_id}", workers=1)

    def hits(split: str) -> tuple[list, np.ndarray, np.ndarray]:
        chosen = [row for row in rows if row.split == split]
        scores = np.array([p.probability for p in predictor.predict_sources([str(data_root / r.path)
                                                                             for r in chosen])], dtype=np.float64)
        return chosen, scores, np.array([row.label for row in chosen])

    val, probabilities, labels = hits("val")
    val_acc = float(np.mean((probabilities >= 0.5) == labels))
    metrics = run.data.metrics
    assert metrics["val/acc"] == pytest.approx(val_acc, abs=1e-6)
    _, train_scores, train_labels = hits("train")
    train_hits = (train_scores >= 0.5) == train_labels
    clean_acc, gap = metrics["train/clean_acc"], metrics["train_val_gap"]
    sampled_hits = clean_acc * len(val)
    assert sampled_hits == pytest.approx(round(sampled_hits), abs=1e-6)  # a count out of len(val) images
    assert len(val) - (~train_hits).sum() <= round(sampled_hits) <= train_hits.sum()  # what the split allows
    assert gap == pytest.approx(clean_acc - val_acc, abs=1e-6)
    assert run.data.tags["overfitting"] == str(gap > float(run.data.params["model.max_gap"])).lower()
    return ValidationRescore(val, probabilities, labels)
