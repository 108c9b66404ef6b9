"""Do straight joints fool the pretrained features, and does showing them in training help on other surfaces?

    python scripts/joints_probe_study.py --data ../shared/data/concrete_crack \
        --surfaces ../shared/data/other_surfaces/concrete ../shared/data/other_surfaces/ceramic_tile [--seed 0]

The linear probe of the default recipe (``crackclf.training.probe.fit_logistic_head`` on the frozen
tf_efficientnet_lite0's features at 96 px, as the ``linear_probe`` callback fits it) on ``--images`` random images of
the data set, each seen once: clean, and through the recipe's ``camera`` augmentation with no joints, with its own
``joints_p`` and with ``--joints-p`` (``crackclf.data.augment.paint_joints``). Each head is scored on held-out images
of the data set, on the same images with joints painted on (does a joint turn a surface into a crack?), and on every
labelled folder of ``--surfaces`` (balanced accuracy at 0.5, AUROC). Forward passes only: a diagnosis in a few
minutes, not the recipe (``make bench-recipe`` then ``make bench-transfer`` measure that).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench_transfer import class_dirs_of
from crackclf.data.augment import paint_joints
from crackclf.data.images import load_resized
from crackclf.inference.evaluate import labelled_files
from crackclf.metrics import binary_metrics
from crackclf.training.probe import fit_logistic_head
from norm_stats_study import REPO, build, features, load

SIZE = 96


def folder_images(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a labelled folder at the recipe's size, uint8 NCHW, and its labels."""
    files = labelled_files(folder, class_dirs_of(folder, None))
    images = torch.stack([torch.from_numpy(load_resized(path, SIZE)).permute(2, 0, 1) for path, _ in files])
    return images, torch.tensor([label for _, label in files])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "concrete_crack")
    parser.add_argument("--surfaces", type=Path, nargs="*", default=[])
    parser.add_argument("--images", type=int, default=4000, help="images the head is fitted on (the default's)")
    parser.add_argument("--held-out", type=int, default=1500)
    parser.add_argument("--joints-p", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    images, labels = load(args.data, args.images + args.held_out, SIZE, args.seed)
    train, held = slice(0, args.images), slice(args.images, None)
    net, _ = build(False)
    net.eval()

    def embed(batch: torch.Tensor) -> torch.Tensor:
        return features(net, batch, [], False)

    camera = OmegaConf.load(REPO / "conf" / "augmentation" / "camera.yaml")
    arms = {"clean": images[train]}
    for joints_p in sorted({0.0, float(camera.joints_p), args.joints_p}):
        arms[f"camera, joints_p={joints_p:g}"] = instantiate(camera, joints_p=joints_p)(images[train])
    clean_held = images[held].float() / 255
    sets = {"held out": (embed(clean_held), labels[held]),
            "held out + joints": (embed(paint_joints(clean_held, generator=torch.Generator().manual_seed(args.seed))),
                                  labels[held])}
    for folder in args.surfaces:
        surface_images, surface_labels = folder_images(folder)
        sets[folder.name] = (embed(surface_images), surface_labels)
    print(f"seed {args.seed}, head fitted on {args.images} images; held out {len(clean_held)}; "
          "balanced accuracy at 0.5 / AUROC")
    print(f"{'probe fitted on':28s}" + "".join(f"{name:>24s}" for name in sets))
    for arm, arm_images in arms.items():
        weight, bias = fit_logistic_head(embed(arm_images), labels[train], 0.005)
        cells = []
        for feats, truth in sets.values():
            scores = (feats @ weight.T + bias).softmax(1)[:, 1].numpy()
            metrics, _ = binary_metrics(scores, truth.numpy(), 0.5)
            cells.append(f"{metrics['balanced_acc'] * 100:6.2f} % / {metrics['auroc']:.3f}")
        print(f"{arm:28s}" + "".join(f"{cell:>24s}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
