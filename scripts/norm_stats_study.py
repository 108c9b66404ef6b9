"""Why a short fine-tune after the linear probe lost accuracy, and what `backbone.freeze_norm_stats` changes.

    python scripts/norm_stats_study.py --data ../shared/data/concrete_crack [--images 2560] [--steps 40]

Part 1 fits the probe's head (``crackclf.training.probe.fit_logistic_head``) on the frozen network's eval-mode
features of some training images and scores it on the features the network gives in *training* mode, where the
BatchNorm layers of the trainable stages normalise with each batch's statistics instead of their ImageNet running
statistics: what the first training steps feed the head. Part 2 fine-tunes from that head for ``--steps`` steps at a
constant learning rate (no schedule) with the recipe's augmentation, with and without the statistics frozen, and
scores held-out images. Small and single-process: a diagnosis, not the recipe (``make bench-recipe`` measures that).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from crackclf.data.images import list_image_files, load_resized
from crackclf.models.backbone import CrackNet, create_backbone
from crackclf.training.probe import fit_logistic_head

REPO = Path(__file__).resolve().parents[1]
BATCH = 64


def load(root: Path, count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random images of ``Negative/`` and ``Positive/``, as uint8 NCHW at ``size`` px, and their labels."""
    files = [(p, label) for label, name in enumerate(("Negative", "Positive"))
             for p in list_image_files(root / name, folders=False)]
    random.Random(seed).shuffle(files)
    files = files[:count]
    images = torch.stack([torch.from_numpy(load_resized(p, size)).permute(2, 0, 1) for p, _ in files])
    return images, torch.tensor([label for _, label in files])


def build(freeze_norm_stats: bool) -> tuple[CrackNet, list[torch.nn.Module]]:
    cfg = OmegaConf.load(REPO / "conf" / "backbone" / "tf_efficientnet_lite0.yaml")
    built = create_backbone(cfg.name, True, num_classes=2, freeze_groups=cfg.freeze_groups, drop_rate=cfg.drop_rate,
                            freeze_norm_stats=freeze_norm_stats)
    return CrackNet(built.model, built.mean, built.std), built.frozen_norms


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images


def features(net: CrackNet, images: torch.Tensor, frozen_norms: list, training_mode: bool) -> torch.Tensor:
    """Pre-logit features; ``training_mode``: the trainable stages' BatchNorm layers use batch statistics (their
    running statistics are restored afterwards), dropout stays off."""
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    if training_mode:
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module not in frozen_norms:
                module.train()
    with torch.no_grad():
        out = torch.cat([net.features(as_float(images[i:i + BATCH])) for i in range(0, len(images), BATCH)])
    net.eval()
    net.load_state_dict(saved)
    return out


def fine_tune(images, labels, train, held, augment, lr: float, freeze_norm_stats: bool, steps: int, seed: int):
    torch.manual_seed(seed)
    net, frozen_norms = build(freeze_norm_stats)
    weight, bias = fit_logistic_head(features(net, images[train], frozen_norms, False), labels[train], 0.005)
    head = net.backbone.get_classifier()
    head.weight.data.copy_(weight)
    head.bias.data.copy_(bias)
    optimiser = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    losses = []
    for step in range(steps):
        net.train()
        for norm in frozen_norms:
            norm.eval()
        rows = train[(step * BATCH) % len(train):][:BATCH]
        loss = F.cross_entropy(net(as_float(augment(images[rows]))), labels[rows], label_smoothing=0.05)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(as_float(images[held][i:i + BATCH])).argmax(1) for i in range(0, len(held), BATCH)])
    return float(np.mean(losses[:5])), float(np.mean(losses[-10:])), float((predicted == labels[held]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "concrete_crack")
    parser.add_argument("--images", type=int, default=2560, help="images read: 60 %% train, 40 %% held out")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 5e-4, 2e-4])
    args = parser.parse_args()
    images, labels = load(args.data, args.images, args.size, args.seed)
    cut = int(0.6 * len(images))
    train, held = torch.arange(cut), torch.arange(cut, len(images))
    augment = instantiate(OmegaConf.load(REPO / "conf" / "augmentation" / "camera.yaml"))

    print("Part 1: the probe's head, fitted on eval-mode features, scored on the features it meets (accuracy)")
    print("| fitted on | eval mode, train / held out | training mode, train / held out |\n| --- | --- | --- |")
    net, frozen_norms = build(False)
    eval_mode = features(net, images, frozen_norms, False)
    training_mode = features(net, images, frozen_norms, True)
    weight, bias = fit_logistic_head(eval_mode[train], labels[train], 0.005)

    def accuracy(values: torch.Tensor, rows: torch.Tensor) -> float:
        return float(((values[rows] @ weight.T + bias).argmax(1) == labels[rows]).float().mean())

    print(f"| {len(train)} images | {accuracy(eval_mode, train):.4f} / {accuracy(eval_mode, held):.4f} | "
          f"{accuracy(training_mode, train):.4f} / {accuracy(training_mode, held):.4f} |")

    print(f"\nPart 2: {args.steps} fine-tuning steps of {BATCH} from the probe's head, constant learning rate")
    print("| learning rate | freeze_norm_stats | loss, first 5 steps | loss, last 10 | held-out accuracy |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for lr in args.lrs:
        for frozen in (False, True):
            first, last, held_acc = fine_tune(images, labels, train, held, augment, lr, frozen, args.steps, args.seed)
            print(f"| {lr:g} | {str(frozen).lower()} | {first:.3f} | {last:.3f} | {held_acc:.4f} |", flush=True)


if __name__ == "__main__":
    main()
