"""Benchmark the data path: decode-once cache + batch augmentation vs torchvision ImageFolder + PIL + DataLoader.

Measures images/s of (a) the loader alone (batches ready for the model: resized, augmented, float in [0, 1]) and
(b) full training steps (loader + forward + backward + optimizer step, Lightning Trainer) with the default model
from conf/ (composed with Hydra: backbone, image size, batch size, augmentation), for both pipelines in one run,
same model, same batch size, same augmentation parameters. The cache is built before timing (it is built once per
data set and reused by every run); the JSON records how long that build took. Each measurement alternates the two
pipelines ``--repeats`` times and reports medians, so a load that changes during the run (a shared machine) hits
both sides alike; the ratio of every repeat is printed too.

    python scripts/bench_data.py --data ../shared/data/concrete_crack        # or: make bench-data
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from _bench import alternate_rounds, environment, write_json  # noqa: E402
from crackclf.config import compose_config  # noqa: E402
from crackclf.utils import keep_freed_memory, worker_count  # noqa: E402


def torchvision_transform(size: int, aug: dict):
    """Per-image torchvision transforms with the same parameters as the ``BatchAugment`` the config builds."""
    from PIL import Image
    from torchvision import transforms as T

    steps = [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if aug.get("rot90", 0) > 0:
        steps.append(T.RandomApply([T.Lambda(lambda im: im.transpose(Image.Transpose.TRANSPOSE))], p=aug["rot90"]))
    if aug.get("hflip", 0) > 0:
        steps.append(T.RandomHorizontalFlip(aug["hflip"]))
    if aug.get("vflip", 0) > 0:
        steps.append(T.RandomVerticalFlip(aug["vflip"]))
    if aug.get("crop_p", 0) > 0 and aug.get("crop_scale", 1.0) < 1.0:
        crop = T.RandomResizedCrop(size, scale=(aug["crop_scale"], 1.0), ratio=(3 / 4, 4 / 3), antialias=True)
        steps.append(T.RandomApply([crop], p=aug["crop_p"]))
    if aug.get("jitter_p", 0) > 0:
        jitter = T.ColorJitter(aug.get("brightness", 0), aug.get("contrast", 0), aug.get("saturation", 0),
                               aug.get("hue", 0))
        steps.append(T.RandomApply([jitter], p=aug["jitter_p"]))
    if aug.get("grayscale_p", 0) > 0:
        steps.append(T.RandomGrayscale(aug["grayscale_p"]))
    if aug.get("blur_p", 0) > 0:
        steps.append(T.RandomApply([T.GaussianBlur(5, (0.3, aug.get("blur_sigma", 1.0)))], p=aug["blur_p"]))
    steps.append(T.ToTensor())
    if aug.get("noise_p", 0) > 0:
        std = aug.get("noise_std", 0.03)
        steps.append(T.RandomApply([T.Lambda(lambda x: (x + torch.randn_like(x) * std).clamp_(0, 1))],
                                   p=aug["noise_p"]))
    return T.Compose(steps)


def imagefolder_loader(root: Path, size: int, batch_size: int, aug: dict, workers: int, seed: int):
    """The plain pipeline: ImageFolder (PIL decode) → per-image transforms → DataLoader with worker processes."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=torchvision_transform(size, aug))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


class _CacheLoader:
    """The crackclf training path without a Trainer: cached uint8 batches → float → BatchAugment (as in fit).

    ``threads`` limits torch to that many threads while converting and augmenting (default: all, as in fit).
    """

    def __init__(self, datamodule, augment: bool = True, threads: int | None = None) -> None:
        self.datamodule, self.augment, self.threads = datamodule, augment, threads

    def __iter__(self):
        every = torch.get_num_threads()
        for images, labels in self.datamodule.train_dataloader():
            torch.set_num_threads(self.threads or every)
            try:
                yield self.datamodule.model_input(images, augment=self.augment), labels
            finally:
                torch.set_num_threads(every)


def time_loader(batches, count: int, warmup: int, batch_size: int) -> dict:
    """Images/s over ``count`` batches after ``warmup`` batches (worker start-up excluded).

    The iterator is shut down before returning: DataLoader workers left prefetching would otherwise keep decoding
    while the next measurement (of the other pipeline) runs, and steal its cores.
    """
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    seconds = time.perf_counter() - start
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    del iterator
    gc.collect()
    return {"images": count * batch_size, "seconds": round(seconds, 3), "images_per_s": count * batch_size / seconds}


def time_training(cfg, fit_kwargs: dict, steps: int, warmup: int, batch_size: int) -> dict:
    """Images/s of ``steps`` Lightning training steps (after ``warmup`` steps) of a fresh default model."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx == warmup + steps - 1:
                self.seconds = time.perf_counter() - self.start

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = instantiate(cfg.model)
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, callbacks=[clock],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, **fit_kwargs)
    del trainer  # its DataLoader workers must be gone before the next measurement starts
    gc.collect()
    return {"images": steps * batch_size, "seconds": round(clock.seconds, 3),
            "images_per_s": steps * batch_size / clock.seconds}


#: BatchAugment parameters per transform, to time each one alone (``--breakdown``).
TRANSFORMS = {
    "orientation": ("hflip", "vflip", "rot90"),
    "resized crop": ("crop_scale", "crop_p"),
    "colour jitter": ("brightness", "contrast", "saturation", "hue", "jitter_p"),
    "grayscale": ("grayscale_p",),
    "blur": ("blur_p", "blur_sigma"),
    "noise": ("noise_p", "noise_std"),
    "zoom out": ("zoom_out_p", "zoom_out_scale"),
    "gamma": ("gamma_p", "gamma"),
    "sharpen": ("sharpen_p", "sharpen_amount"),
    "joints": ("joints_p", "joints_width"),
    "texture": ("texture_p", "texture_strength"),
    "jpeg": ("jpeg_p", "jpeg_quality"),
}


def breakdown(cfg, aug: dict, batch_size: int, size: int, repeats: int = 15) -> dict:
    """Median ms per batch of each augmentation transform alone on a uint8 batch (1 thread; uint8 → float included),
    of the whole configured augmentation, and of a bare training step of the model (synthetic input), each on 1
    and on all threads."""
    import torch.nn.functional as F
    from hydra.utils import instantiate

    from crackclf.data.augment import BatchAugment

    all_threads = torch.get_num_threads()
    batch = torch.rand(batch_size, 3, size, size)
    cached = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)  # as the cache delivers it

    def median_ms(call, count: int = repeats) -> float:
        call()
        times = []
        for _ in range(count):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return round(1000 * statistics.median(times), 1)

    off = {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0}
    result: dict = {"augmentation_ms_1_thread": {}}
    torch.set_num_threads(1)
    for name, keys in TRANSFORMS.items():
        transform = BatchAugment(**{**off, **{k: aug[k] for k in keys if k in aug}})
        if transform.active:  # transforms the configured augmentation does not use are not timed
            result["augmentation_ms_1_thread"][name] = median_ms(lambda t=transform: t(cached))
    whole = BatchAugment(**aug)
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        result[f"whole_augmentation_ms_{threads}_threads"] = median_ms(lambda: whole(cached), count=3 * repeats)
    model = instantiate(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = torch.randint(0, 2, (batch_size,))

    def step() -> None:
        loss = F.cross_entropy(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        result[f"model_step_ms_{threads}_threads"] = median_ms(step, count=6)
    torch.set_num_threads(all_threads)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "CRACKCLF_SHARED_DATA", REPO.parent / "shared" / "data" / "concrete_crack")))
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $CRACKCLF_CACHE or .cache/crackclf")
    parser.add_argument("--loader-batches", type=int, default=30, help="timed batches, loader alone")
    parser.add_argument("--train-steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches/steps before each measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of each measurement")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each augmentation transform and a bare model step (1 vs all threads)")
    parser.add_argument("--workers", type=int, default=worker_count(), help="ImageFolder DataLoader workers")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "bench_data.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. backbone=resnet18 data.image_size=96")
    args = parser.parse_args()
    keep_freed_memory()  # as train.py does
    if not (args.data / "Positive").is_dir():
        parser.error(f"--data {args.data} has no Positive/ folder; pass the data set folder")

    cache_dir = args.cache_dir or Path(os.environ.get("CRACKCLF_CACHE", REPO / ".cache" / "crackclf"))
    # paths.* normally come from the Hydra run (cwd, output dir); fixed here since no run is started.
    cfg = compose_config([f"data.root={args.data.resolve()}", f"paths.root_dir={REPO}",
                          f"paths.output_dir={args.out.parent}", f"data.cache_dir={cache_dir}", "data.progress=false",
                          *args.overrides], return_hydra_config=True)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    size, batch_size = int(cfg.data.image_size), int(cfg.data.batch_size)
    aug = OmegaConf.to_container(cfg.augmentation, resolve=True)
    aug.pop("_target_", None)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # This data path: inventory → split → cache (built here, before any timing).
    datamodule = instantiate(cfg.data, augment=instantiate(cfg.augmentation))
    start = time.perf_counter()
    datamodule.setup("fit")
    prepare_s = time.perf_counter() - start
    def baseline(augmentation: dict):
        return imagefolder_loader(args.data, size, batch_size, augmentation, args.workers, cfg.seed)

    results: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "data": str(args.data), "images_in_data": len(datamodule.rows),
        "backbone": cfg.backbone.name, "image_size": size, "batch_size": batch_size,
        "augmentation": aug, "imagefolder_workers": args.workers,
        **environment(), "torch_threads": torch.get_num_threads(),
        "cache_prepare_seconds": round(prepare_s, 2), "repeats": args.repeats,
        "load_average_before": os.getloadavg(),
    }
    print(f"{cfg.backbone.name} at {size}px, batch {batch_size}, {worker_count()} cores; cache ready "
          f"in {prepare_s:.1f}s (0 when reused)", flush=True)
    few = max(6, args.loader_batches // 4)  # the slow pipeline needs fewer batches for a stable rate
    ours_loader = _CacheLoader(datamodule)
    results["loader"] = alternate(
        lambda: time_loader(ours_loader, args.loader_batches, args.warmup, batch_size),
        lambda: time_loader(baseline(aug), few, args.warmup, batch_size), args.repeats)
    # Where the time goes: the same two loaders with augmentation off (cache gather vs decode + resize).
    bare_loader = _CacheLoader(datamodule, augment=False)
    results["loader_no_augmentation"] = alternate(
        lambda: time_loader(bare_loader, args.loader_batches, args.warmup, batch_size),
        lambda: time_loader(baseline({}), few, args.warmup, batch_size), args.repeats)
    # What the augmentation gains from the other cores: the same loader on one thread.
    one_thread = _CacheLoader(datamodule, threads=1)
    threads = results["augment_all_vs_one_thread"] = alternate(
        lambda: time_loader(ours_loader, args.loader_batches, args.warmup, batch_size),
        lambda: time_loader(one_thread, args.loader_batches, args.warmup, batch_size), args.repeats,
        names=(f"{torch.get_num_threads()}_threads", "one_thread"))
    print(f"loaders done; augmentation on {torch.get_num_threads()} threads vs 1: {threads['ratio']:.1f}x faster "
          f"(per repeat: {', '.join(f'{r:.1f}' for r in threads['ratio_per_repeat'])})", flush=True)
    results["train_step"] = alternate(
        lambda: time_training(cfg, {"datamodule": datamodule}, args.train_steps, args.warmup, batch_size),
        lambda: time_training(cfg, {"train_dataloaders": baseline(aug)}, args.train_steps, args.warmup, batch_size),
        args.repeats)
    if args.breakdown:
        results["breakdown"] = breakdown(cfg, aug, batch_size, size)
        print("breakdown (median ms per batch):", json.dumps(results["breakdown"]), flush=True)
    results["load_average_after"] = os.getloadavg()
    write_json(args.out, results)
    print(table(results))
    print(f"\nwritten: {args.out}")
    return 0


def alternate(ours, theirs, repeats: int, names: tuple[str, str] = ("cache_batchaugment", "imagefolder_pil")) -> dict:
    """Measure ours, theirs, ours, theirs, ...: the medians and their ratio hold up when the machine's load drifts."""
    runs = alternate_rounds({names[0]: ours, names[1]: theirs}, repeats)
    summary: dict = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in measured), "runs": measured}
                     for name, measured in runs.items()}
    summary["ratio"] = summary[names[0]]["images_per_s"] / summary[names[1]]["images_per_s"]
    summary["ratio_per_repeat"] = [a["images_per_s"] / b["images_per_s"]
                                   for a, b in zip(runs[names[0]], runs[names[1]], strict=True)]
    return summary


def table(results: dict) -> str:
    """A Markdown table of images/s (median of the repeats) and ratios."""
    rows = ["| measurement | cache + BatchAugment | ImageFolder + PIL + DataLoader | ratio |", "|---|---:|---:|---:|"]
    for key, label in (("loader", "loader alone (img/s)"),
                       ("loader_no_augmentation", "loader alone, augmentation off (img/s)"),
                       ("train_step", f"training steps, {results['backbone']} (img/s)")):
        ours, base = results[key]["cache_batchaugment"], results[key]["imagefolder_pil"]
        spread = ", ".join(f"{r:.1f}" for r in results[key]["ratio_per_repeat"])
        rows.append(f"| {label} | {ours['images_per_s']:,.0f} | {base['images_per_s']:,.0f} | "
                    f"{results[key]['ratio']:.1f}x ({spread}) |")
    load = results["load_average_before"][0], results["load_average_after"][0]
    return "\n".join(rows) + (
        f"\n\nmedians of {results['repeats']} alternating repeats (ratio per repeat in brackets); "
        f"{results['image_size']} px, batch {results['batch_size']}, {results['cores']} CPU cores ({results['cpu']}), "
        f"{results['imagefolder_workers']} DataLoader workers; load average {load[0]:.1f} before, {load[1]:.1f} after"
    )


if __name__ == "__main__":
    sys.exit(main())
