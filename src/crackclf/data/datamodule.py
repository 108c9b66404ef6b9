"""LightningDataModule: wires the prepared rows (:mod:`crackclf.data.prepare`), the decode-once cache, the datasets
(:mod:`crackclf.data.datasets`) and the samplers (:mod:`crackclf.data.samplers`) into Lightning's loaders, and holds
the training-order contract the callbacks use (:class:`crackclf.training.contracts.TrainingData`)."""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler

from crackclf.data import inventory as inv
from crackclf.data.augment import BatchAugment
from crackclf.data.cache import build_cache
from crackclf.data.datasets import CachedBatches, DataError, FileImages
from crackclf.data.prepare import DataSource, PreparedData, SplitSettings, parse_sources, prepare_rows, prepare_sources
from crackclf.data.samplers import EpochBatchSampler, EpochShuffle, FocusableOrder, WeightedEpochDraw
from crackclf.data.shifted import SHIFTED_DUPLICATE_BITS
from crackclf.data.split import SPLITS, SplitRow, SplitSummary

__all__ = ["CrackDataModule", "DataError"]

log = logging.getLogger(__name__)


class CrackDataModule(pl.LightningDataModule):
    """Two-class image folders → train/val/test batches of uint8 images, augmented on the device.

    Args:
        root: data folder with one sub-folder per class; ``None`` downloads the reference data set.
        class_dirs: sub-folder names, in label order (default ``Negative`` = 0 = no crack, ``Positive`` = 1).
        class_names: human names of the classes, in the same order.
        image_size: side of the square the images are resized to.
        batch_size, num_workers: loader settings (``num_workers`` only matters with ``cache=false``).
        val_fraction, test_fraction: shares of each class held out; groups of duplicates stay whole.
        max_per_class: keep at most this many images per class (spread over the splits) for quick runs.
        seed: split and data-order seed.
        split_file: a split CSV to use instead of computing one.
        test_root: a separate labelled folder used as the test split (``test_fraction`` is then ignored).
        cache: decode once into a uint8 array (default); ``False`` decodes files every epoch.
        cache_dir: where inventories, splits and image caches are stored.
        download_dir: where the reference data set is downloaded to when ``root`` is ``None``.
        near_duplicate_bits: perceptual-hash distance that joins near-duplicates (``None``: exact copies only).
        shifted_duplicate_bits: window-hash distance that joins shifted copies (:mod:`crackclf.data.shifted`;
            ``None``: not searched; also off when ``near_duplicate_bits`` is ``None``).
        sources: several labelled folders instead of ``root`` (:func:`crackclf.data.prepare.parse_sources`): each
            split by itself, mixed in training by their ``weight``, scored per source.
        min_per_class: refuse to train when a class has fewer readable training images.
        augment: the batch augmentation for training (``None``: none).
        gpu_cache: with CUDA, keep the cache on the GPU and build/augment batches there.
    """

    def __init__(
        self,
        root: str | None,
        class_dirs: tuple[str, str] = ("Negative", "Positive"),
        class_names: tuple[str, str] = ("no_crack", "crack"),
        image_size: int = 96,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        max_per_class: int | None = None,
        seed: int = 42,
        split_file: str | None = None,
        test_root: str | None = None,
        cache: bool = True,
        cache_dir: str = ".cache/crackclf",
        download_dir: str = "data",
        near_duplicate_bits: int | None = inv.NEAR_DUPLICATE_BITS,
        shifted_duplicate_bits: int | None = SHIFTED_DUPLICATE_BITS,
        sources: list | None = None,
        min_per_class: int = 10,
        augment: BatchAugment | None = None,
        gpu_cache: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root).resolve() if root else None
        self.class_dirs, self.class_names = tuple(class_dirs), tuple(class_names)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.val_fraction, self.test_fraction, self.max_per_class = val_fraction, test_fraction, max_per_class
        self.seed, self.split_file, self.test_root = seed, split_file, Path(test_root).resolve() if test_root else None
        self.cache, self.cache_dir, self.download_dir = cache, Path(cache_dir), Path(download_dir)
        self.near_duplicate_bits, self.min_per_class = near_duplicate_bits, min_per_class
        self.shifted_duplicate_bits = shifted_duplicate_bits
        self.sources: tuple[DataSource, ...] = parse_sources(sources, self.class_dirs) if sources is not None else ()
        self.augment, self.gpu_cache, self.progress = augment, gpu_cache, progress
        self.prepared: PreparedData | None = None  # the rows and what preparing them found (prepare())
        self._datasets: dict[str, Dataset] = {}
        self._cache_build: Future | None = None
        self._resume_at: tuple[int, int] | None = None  # set from a checkpoint by load_state_dict
        # Side of the training batches when smaller than image_size (set per epoch by ProgressiveResize).
        self.train_size: int | None = None
        # (epoch, global order of training rows) drawn by HardExampleFocus; None: a uniform shuffle every epoch.
        self._train_order: tuple[int, torch.Tensor] | None = None
        self._train_batches: EpochBatchSampler | None = None
        self.last_train_rows: torch.Tensor | None = None  # rows of the batch being trained on

    # ----------------------------------------------------------------------------------------------- preparation
    def prepare(self, prefetch_cache: bool = False) -> None:
        """Scan and split (idempotent; safe to call before the Trainer exists). With ``prefetch_cache``, the image
        caches are gathered or built in the background; :meth:`setup` waits for them."""
        if self.prepared is not None:
            return
        if self.root is None and not self.sources or any(source.root is None for source in self.sources):
            from crackclf.data.download import ensure_dataset

            reference = ensure_dataset(self.download_dir)
            self.root = self.root or reference
            self.sources = tuple(DataSource(s.name, s.root or reference, s.class_dirs, s.weight) for s in self.sources)
        settings = SplitSettings(
            class_dirs=self.class_dirs, class_names=self.class_names, val_fraction=self.val_fraction,
            test_fraction=self.test_fraction, max_per_class=self.max_per_class, seed=self.seed,
            split_file=self.split_file, test_root=self.test_root, cache_dir=self.cache_dir,
            near_duplicate_bits=self.near_duplicate_bits, shifted_duplicate_bits=self.shifted_duplicate_bits,
            min_per_class=self.min_per_class, progress=self.progress,
            decode_size=self.image_size if self.cache else None)
        # Only rank zero reports; a DDP rank skips the verify report's near-duplicate search.
        report = rank_zero_only.rank == 0
        if self.sources:
            self.prepared = prepare_sources(self.sources, settings, report=report)
            self.root = self.prepared.root
        else:
            self.prepared = prepare_rows(self.root, settings, report=report)
        if prefetch_cache and self.cache:
            # Gather (or decode) the caches in the background: the run meanwhile builds the model, opens its MLflow
            # run and starts its other DDP processes, which would otherwise leave cores idle. Every rank does, each
            # into its own memory; a cache that must be decoded is decoded by one of them (its file lock), the
            # others wait for its file. setup() waits for it and reports its errors.
            pool = ThreadPoolExecutor(1, thread_name_prefix="crackclf-cache")
            self._cache_build = pool.submit(self._split_caches)
            pool.shutdown(wait=False)

    # What preparing found, read by the run's bookkeeping (MLflow inputs, the bundle) and the tests.
    @property
    def rows(self) -> list[SplitRow]:
        """Every row of the run (absolute paths); empty before :meth:`prepare`."""
        return list(self.prepared.rows) if self.prepared is not None else []

    @property
    def split_path(self) -> Path | None:
        return self.prepared.split_path if self.prepared is not None else None

    @property
    def split_summary(self) -> SplitSummary | None:
        return self.prepared.split_summary if self.prepared is not None else None

    @property
    def verify_report(self) -> dict | None:
        return self.prepared.verify_report if self.prepared is not None else None

    def _split_caches(self) -> dict[str, np.ndarray]:
        """Each split's images: gathered from the inventory scan's decoded store, else its decode-once cache file
        (memory-mapped; built where missing)."""
        # The rows hold absolute paths (a split may mix folders: data.test_root), so the cache's root is "/".
        decoded = self.prepared.decoded if self.prepared is not None else ()
        return {split: build_cache(Path("/"), [r.path for r in rows], [r.md5 for r in rows], self.image_size,
                                   self.cache_dir, progress=self.progress, decoded=decoded)
                for split in SPLITS if (rows := self.rows_of(split))}

    def rows_of(self, split: str) -> list[SplitRow]:
        """The rows of one split (none before :meth:`prepare`)."""
        return self.prepared.rows_of(split) if self.prepared is not None else []

    # ------------------------------------------------------------------------------------------------ Lightning
    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        if self._datasets:
            return
        device = torch.device("cpu")
        if self.trainer is not None and self.gpu_cache and self.trainer.strategy.root_device.type == "cuda":
            device = self.trainer.strategy.root_device
        caches: dict[str, np.ndarray] = {}
        if self.cache:
            build, self._cache_build = self._cache_build, None
            caches = build.result() if build is not None else self._split_caches()
        for split in SPLITS:
            rows = self.rows_of(split)
            if not rows:
                continue
            labels = [r.label for r in rows]
            if self.cache:
                array = caches[split]
                # One read of the memory map into RAM, planar (N, 3, H, W): the batch augmentation's flips, transposes
                # and per-channel arithmetic run on long contiguous runs of one channel.
                images = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2))).to(device)
                self._datasets[split] = CachedBatches(images, torch.tensor(labels, device=device))
            else:
                self._datasets[split] = FileImages([Path(r.path) for r in rows], labels, self.image_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self._datasets[split]
        generator = torch.Generator().manual_seed(self.seed)
        shard = None
        if self.trainer is not None and self.trainer.world_size > 1:
            # DDP (trainer=ddp sets use_distributed_sampler=false): every rank reads its own shard. Lightning's
            # sampler replacement cannot rebuild the whole-batch sampler of the cached path, so we shard here.
            shard = DistributedSampler(dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=shuffle,
                                       seed=self.seed)
        base = shard if shard is not None else (
            EpochShuffle(len(dataset), self.seed) if shuffle else SequentialSampler(dataset))
        if split == "train":
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if shard is not None else (0, 1)
            weights = self._row_weights("train")
            if weights is not None:  # sources of different weights: drawn, not permuted
                base = WeightedEpochDraw(weights, self.seed, rank, world)
            base = FocusableOrder(base, rank, world, lambda: self._train_order)
        drop_last = shuffle and len(base) > self.batch_size
        sampler = EpochBatchSampler(base, self.batch_size, drop_last=drop_last)
        if split == "train":
            sampler.resume_at = self._resume_at
            sampler.pending = deque()
            self._train_batches = sampler
        # A generator of its own keeps DataLoader iterators from drawing on the global RNG (augmentation's).
        if isinstance(dataset, CachedBatches):
            return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0, generator=generator)
        return DataLoader(dataset, batch_sampler=sampler, generator=generator, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def _row_weights(self, split: str) -> torch.Tensor | None:
        """Each row's source weight, or ``None`` when every row weighs the same (a uniform permutation)."""
        weight_of = {source.name: source.weight for source in self.sources}
        if len(set(weight_of.values())) < 2:
            return None
        return torch.tensor([weight_of[row.source] for row in self.rows_of(split)], dtype=torch.float64)

    # ------------------------------------------------------------------------------------------- per-source scores
    @property
    def source_names(self) -> tuple[str, ...]:
        """The sources' names in a multi-source run (``data.sources``); empty for a single folder."""
        return tuple(source.name for source in self.sources)

    def gathered_rows(self, split: str) -> np.ndarray:
        """Row number (in :meth:`rows_of`) of each prediction of an evaluation pass over ``split``, in the order the
        model gathers them: one process, the rows in order; DDP, rank after rank, each rank's DistributedSampler
        shard (every ``world``-th row of the list padded by repeating its start)."""
        count = len(self.rows_of(split))
        world = self.trainer.world_size if self.trainer is not None else 1
        if world <= 1:
            return np.arange(count)
        per_rank = -(-count // world)
        ranks, steps = np.divmod(np.arange(per_rank * world), per_rank)
        return (ranks + steps * world) % count

    def state_dict(self) -> dict:
        """Where training is in the data — (epoch, batches trained in it) — stored in every checkpoint."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        epochs = trainer.fit_loop.epoch_progress.current
        started = epochs.started > epochs.processed  # saved inside an epoch, not between two
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed if started else 0
        return {"epoch": epochs.processed, "batches_done": batches}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the data order where the checkpoint left it (:class:`crackclf.data.samplers.EpochBatchSampler`)."""
        if state_dict:
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    # ------------------------------------------------------------------------------------ hard-example focus
    @property
    def train_rows_count(self) -> int:
        """Rows of the training split (the row numbers the training batches are drawn from)."""
        return len(self._datasets["train"])

    @property
    def train_draws_per_epoch(self) -> int:
        """Rows one epoch draws over all ranks (DistributedSampler pads every shard to the same length; a weighted
        draw has that length too)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        return world * -(-self.train_rows_count // world)

    def set_train_order(self, order: torch.Tensor, epoch: int) -> None:
        """Train ``epoch`` on ``order``: ``train_draws_per_epoch`` row numbers over all ranks, the same on every
        rank; each rank trains on every ``world_size``-th of them. Other epochs keep the uniform shuffle."""
        self._train_order = (int(epoch), order.long().cpu())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def train_sample_dataloader(self, size: int) -> DataLoader:
        """``size`` training rows drawn once with the data seed, unaugmented and in order: the training split
        measured the way validation is (the honest train–val gap). Under DDP each rank reads every
        ``world_size``-th of them."""
        dataset = self._datasets["train"]
        generator = torch.Generator().manual_seed(self.seed)
        rows = torch.randperm(len(dataset), generator=generator)[: max(1, size)].tolist()
        if self.trainer is not None and self.trainer.world_size > 1:
            rows = rows[self.trainer.global_rank :: self.trainer.world_size]
        batches = BatchSampler(rows, self.batch_size, drop_last=False)
        if isinstance(dataset, CachedBatches):
            return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=0)
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 → float in [0, 1] on the device; augment (and progressively resize) only while fitting."""
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        if training and self._train_batches is not None and self._train_batches.pending:
            self.last_train_rows = torch.as_tensor(self._train_batches.pending.popleft())
        if training and self.train_size and self.train_size != images.shape[-1]:
            # Shrink the uint8 batch before augmenting: PyTorch's antialiased uint8 resize is ~10x faster than
            # the float one, and the augmentation then touches fewer pixels.
            images = F.interpolate(images, size=(self.train_size, self.train_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return self.model_input(images, augment=training, labels=labels), labels

    def model_input(self, images: torch.Tensor, augment: bool, labels: torch.Tensor | None = None) -> torch.Tensor:
        """A uint8 (B, 3, H, W) batch → float in [0, 1], through the batch augmentation when ``augment``.

        The augmentation takes the uint8 batch itself: it flips and rotates before converting to float. With
        ``labels``, an augmentation that paints synthetic cracks (``augmentation.cracks_p``) relabels those samples
        in place.
        """
        if augment and self.augment is not None:
            return self.augment(images, labels)
        return images.float().div_(255.0)
