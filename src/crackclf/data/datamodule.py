"""LightningDataModule: inventory → leakage-free split → decode-once cache → batches → augmentation."""

from __future__ import annotations

import itertools
import logging
import random
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from crackclf.data import inventory as inv
from crackclf.data.augment import BatchAugment
from crackclf.data.cache import build_cache
from crackclf.data.images import ImageError, load_resized
from crackclf.data.split import (
    SPLITS,
    SplitRow,
    SplitSummary,
    align_split,
    drop_test_overlap,
    make_split,
    read_split,
    split_key,
    straddling_groups,
    summarize,
    write_split,
)
from crackclf.errors import CrackclfError

log = logging.getLogger(__name__)


class DataError(CrackclfError, ValueError):
    """The data cannot be used for training; the message says which folder/file and what to do."""


class EpochShuffle(Sampler[int]):
    """``range(size)`` in an order that depends only on (seed, epoch): the same recipe as DistributedSampler's, so
    a resumed run (or any run with this seed) sees exactly the same order in every epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _EpochBatchSampler(BatchSampler):
    """Batches of an epoch-seeded sampler; can start part-way into an epoch when a run resumes.

    Lightning calls ``set_epoch`` before each epoch but creates a run's first iterator before that call, so the
    epoch is handed to the inner sampler when iteration starts. ``resume_at`` = (epoch, batches already trained),
    from the checkpoint a run resumes from: that epoch continues with the batches it had not seen.
    """

    epoch = 0
    resume_at: tuple[int, int] | None = None
    # The batches handed out and not yet trained, oldest first (the loader fetches one ahead), so the training
    # step can learn which rows it trained on (crackclf.training.focus records their losses).
    pending: deque | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.resume_at is not None and self._resume_position()[0] != epoch:
            self.resume_at = None  # the resumed epoch is over

    def _resume_position(self) -> tuple[int, int]:
        epoch, done = self.resume_at
        return (epoch + 1, 0) if done >= len(self) else (epoch, done)  # a finished epoch resumes at the next

    def __iter__(self):
        epoch, skip = self._resume_position() if self.resume_at is not None else (self.epoch, 0)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if self.pending is None:
            yield from itertools.islice(super().__iter__(), skip, None)
            return
        self.pending.clear()
        for batch in itertools.islice(super().__iter__(), skip, None):
            self.pending.append(batch)
            yield batch


class _FocusableOrder(Sampler[int]):
    """This rank's share of the training order: the base sampler's, or in an epoch for which a drawn order was set
    (:meth:`CrackDataModule.set_train_order`), that order's every ``world``-th row from ``rank``."""

    def __init__(self, base: Sampler[int], rank: int, world: int,
                 drawn: Callable[[], tuple[int, torch.Tensor] | None]) -> None:
        self.base, self.rank, self.world, self.drawn, self.epoch = base, rank, world, drawn, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        drawn = self.drawn()
        if drawn is not None and drawn[0] == self.epoch:
            return iter(drawn[1][self.rank :: self.world][: len(self)].tolist())
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class _CachedBatches(Dataset):
    """Index with a list of row numbers → one whole batch from the in-memory uint8 cache (no per-item Python)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels  # images: (N, 3, H, W) uint8, planar

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(rows, device=self.images.device)
        # index_select: a row gather ~10x faster on CPU than advanced indexing
        return self.images.index_select(0, index), self.labels.index_select(0, index)


class _FileImages(Dataset):
    """Per-file path (``data.cache=false``): decode and resize each image when it is asked for.

    A file that has become unreadable since the inventory is logged and replaced by the next one, so a
    DataLoader worker never dies of one bad file.
    """

    def __init__(self, paths: list[Path], labels: list[int], size: int) -> None:
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.paths)):
            position = (index + attempt) % len(self.paths)
            try:
                array = load_resized(self.paths[position], self.size)
                return torch.from_numpy(array).permute(2, 0, 1), self.labels[position]
            except ImageError as error:
                log.warning("skipping unreadable training image %s", error)
        raise DataError("no readable image left in this dataset")


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
        min_per_class: refuse to train when a class has fewer readable training images.
        augment: the batch augmentation for training (``None``: none).
        gpu_cache: with CUDA, keep the cache on the GPU and build/augment batches there.
    """

    def __init__(
        self,
        root: str | None,
        class_dirs: tuple[str, str] = ("Negative", "Positive"),
        class_names: tuple[str, str] = ("no_crack", "crack"),
        image_size: int = 64,
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
        self.augment, self.gpu_cache, self.progress = augment, gpu_cache, progress
        self.rows: list[SplitRow] = []
        self.split_path: Path | None = None
        self.split_summary: SplitSummary | None = None
        self.verify_report: dict | None = None
        self._datasets: dict[str, Dataset] = {}
        self._cache_build: Future | None = None
        self._resume_at: tuple[int, int] | None = None  # set from a checkpoint by load_state_dict
        # Side of the training batches when smaller than image_size (set per epoch by ProgressiveResize).
        self.train_size: int | None = None
        # (epoch, global order of training rows) drawn by HardExampleFocus; None: a uniform shuffle every epoch.
        self._train_order: tuple[int, torch.Tensor] | None = None
        self._train_batches: _EpochBatchSampler | None = None
        self.last_train_rows: torch.Tensor | None = None  # rows of the batch being trained on

    # ----------------------------------------------------------------------------------------------- preparation
    def prepare(self, prefetch_cache: bool = False) -> None:
        """Scan and split (idempotent; safe to call before the Trainer exists). With ``prefetch_cache``, rank zero
        starts building the image caches in the background; :meth:`setup` waits for them."""
        if self.rows:
            return
        if self.root is None:
            from crackclf.data.download import ensure_dataset

            self.root = ensure_dataset(self.download_dir)
        inventory = inv.scan(self.root, self.class_dirs, self.cache_dir, progress=self.progress)
        if rank_zero_only.rank == 0:  # only rank zero reports; a DDP rank skips the ~4 s near-duplicate search
            self.verify_report = inv.verify_report(inventory, self.class_names, self.near_duplicate_bits)
        for bad in inventory.unreadable:
            log.warning("excluded unreadable image %s/%s: %s", self.root, bad.path, bad.error)
        readable = inventory.readable
        if self.split_file:
            self.split_path = Path(self.split_file)
            rows, dropped = align_split(read_split(self.split_path), readable)
            if dropped:
                log.warning("%d row(s) of data.split_file=%s are not readable images under %s and are left out: %s",
                            len(dropped), self.split_path, self.root, ", ".join(dropped[:5]))
            leaking = straddling_groups(rows, readable, self.near_duplicate_bits)
            if leaking:
                log.warning("data.split_file=%s puts %d group(s) of duplicate images in more than one split: test "
                            "scores will be optimistic (`crackclf data split` writes a leakage-free one)",
                            self.split_path, leaking)
        else:
            test_fraction = 0.0 if self.test_root else self.test_fraction
            key = split_key(readable, self.val_fraction, test_fraction, self.seed, self.near_duplicate_bits)
            self.split_path = self.cache_dir / f"split-{key}.csv"
            if self.split_path.exists():
                rows = read_split(self.split_path)
            else:
                rows, _ = make_split(readable, self.val_fraction, test_fraction, self.seed, self.near_duplicate_bits)
                write_split(self.split_path, rows)
        test_rows: list[SplitRow] = []
        if self.test_root:
            test_inventory = inv.scan(self.test_root, self.class_dirs, self.cache_dir, progress=self.progress)
            rows, removed = drop_test_overlap([r for r in rows if r.split != "test"], readable,
                                              test_inventory.readable, self.near_duplicate_bits)
            if removed:
                log.warning("left out %d train/val image(s) that are copies of images in data.test_root=%s",
                            removed, self.test_root)
            test_rows = [SplitRow(str(self.test_root / r.path), r.label, -1, "test", r.md5)
                         for r in test_inventory.readable]
        self.split_summary = summarize(rows + test_rows)
        rows = [SplitRow(str(self.root / r.path), r.label, r.group, r.split, r.md5) for r in rows] + test_rows
        self.rows = self._subsample(rows)
        self._check_class_sizes()
        if prefetch_cache and self.cache and rank_zero_only.rank == 0:
            # Decode into the caches in the background (worker processes): the run meanwhile builds the model,
            # opens its MLflow run and starts its other DDP processes, which would otherwise leave cores idle.
            # setup() waits for it and reports its errors.
            pool = ThreadPoolExecutor(1, thread_name_prefix="crackclf-cache")
            self._cache_build = pool.submit(self._split_caches)
            pool.shutdown(wait=False)

    def _split_caches(self) -> dict[str, np.ndarray]:
        """Each split's decode-once cache (memory-mapped; built where missing)."""
        return {split: build_cache(Path("/"), [r.path for r in rows], [r.md5 for r in rows], self.image_size,
                                   self.cache_dir, progress=self.progress)
                for split in SPLITS if (rows := self.rows_of(split))}

    def _subsample(self, rows: list[SplitRow]) -> list[SplitRow]:
        if not self.max_per_class:
            return rows
        by_split_class: dict[tuple[str, int], list[SplitRow]] = defaultdict(list)
        for row in rows:
            by_split_class[(row.split, row.label)].append(row)
        per_class_total = defaultdict(int)
        for (_, label), members in by_split_class.items():
            per_class_total[label] += len(members)
        rng = random.Random(self.seed)
        kept = []
        for (_split, label), members in sorted(by_split_class.items()):
            share = len(members) / per_class_total[label]
            keep = max(1, round(self.max_per_class * share))
            kept += rng.sample(members, min(keep, len(members)))
        return sorted(kept, key=lambda r: (SPLITS.index(r.split), r.path))

    def _check_class_sizes(self) -> None:
        """Refuse to train when a class is empty or has fewer than ``min_per_class`` training images (all named)."""
        short = []
        for label, (class_dir, name) in enumerate(zip(self.class_dirs, self.class_names, strict=True)):
            count = sum(1 for r in self.rows if r.split == "train" and r.label == label)
            if count == 0 or count < self.min_per_class:
                found = "no readable training image" if count == 0 else f"only {count} readable training images"
                short.append(f"class '{name}' (folder {self.root}/{class_dir}) has {found}")
        if short:
            raise DataError(
                "; ".join(short) + f" (data.min_per_class={self.min_per_class}). Add images to that folder, fix "
                "the unreadable ones listed above (`crackclf data verify` lists them), or lower data.min_per_class."
            )

    def rows_of(self, split: str) -> list[SplitRow]:
        return [r for r in self.rows if r.split == split]

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
                self._datasets[split] = _CachedBatches(images, torch.tensor(labels, device=device))
            else:
                self._datasets[split] = _FileImages([Path(r.path) for r in rows], labels, self.image_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self._datasets[split]
        generator = torch.Generator().manual_seed(self.seed)
        shard = None
        if self.trainer is not None and self.trainer.world_size > 1:
            # DDP (trainer=ddp sets use_distributed_sampler=false): every rank reads its own shard. Lightning's
            # sampler replacement cannot rebuild the whole-batch sampler of the cached path, so we shard here.
            shard = DistributedSampler(dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=shuffle,
                                       seed=self.seed)
        drop_last = shuffle and len(shard if shard is not None else dataset) > self.batch_size
        base = shard if shard is not None else (
            EpochShuffle(len(dataset), self.seed) if shuffle else SequentialSampler(dataset))
        if split == "train":
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if shard is not None else (0, 1)
            base = _FocusableOrder(base, rank, world, lambda: self._train_order)
        sampler = _EpochBatchSampler(base, self.batch_size, drop_last=drop_last)
        if split == "train":
            sampler.resume_at = self._resume_at
            sampler.pending = deque()
            self._train_batches = sampler
        # A generator of its own keeps DataLoader iterators from drawing on the global RNG (augmentation's).
        if isinstance(dataset, _CachedBatches):
            return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0, generator=generator)
        return DataLoader(dataset, batch_sampler=sampler, generator=generator, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

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
        """Resume the data order where the checkpoint left it (see :class:`_EpochBatchSampler`)."""
        if state_dict:
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    # ------------------------------------------------------------------------------------ hard-example focus
    @property
    def train_rows_count(self) -> int:
        """Rows of the training split (the row numbers the training batches are drawn from)."""
        return len(self._datasets["train"])

    @property
    def train_draws_per_epoch(self) -> int:
        """Rows one epoch draws over all ranks (DistributedSampler pads every shard to the same length)."""
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
        if isinstance(dataset, _CachedBatches):
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
        return self.model_input(images, augment=training), labels

    def model_input(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        """A uint8 (B, 3, H, W) batch → float in [0, 1], through the batch augmentation when ``augment``.

        The augmentation takes the uint8 batch itself: it flips and rotates before converting to float.
        """
        if augment and self.augment is not None:
            return self.augment(images)
        return images.float().div_(255.0)
