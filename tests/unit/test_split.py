"""Leakage-free split on a generated tree with exact and near copies, checked independently; split_file/test_root."""

from __future__ import annotations

import filecmp
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crackclf.data.datamodule import CrackDataModule
from crackclf.data.inventory import NEAR_DUPLICATE_BITS, scan
from crackclf.data.split import SplitRow, make_split, straddling_groups
from tests.conftest import run_cli, write_dataset
from tests.leakage import hash_files, read_rows, straddling

VAL, TEST = 0.2, 0.2


def add_copies(root: Path, seed: int = 0) -> None:
    """Per class: 8 byte-identical copies (one a triple) and 8 retouched re-encodings under new names."""
    rng = np.random.default_rng(seed)
    for class_dir in ("Negative", "Positive"):
        originals = sorted((root / class_dir).glob("0*.jpg"))
        picks = rng.choice(len(originals), size=16, replace=False)
        for n, index in enumerate(picks[:8]):
            shutil.copyfile(originals[index], root / class_dir / f"copy_{n}.jpg")
        shutil.copyfile(originals[picks[0]], root / class_dir / "copy_again.jpg")
        for n, index in enumerate(picks[8:]):
            near_copy(originals[index], root / class_dir / f"reencoded_{n}.jpg")


def near_copy(source: Path, target: Path) -> None:
    """Re-encode ``source`` with a small retouch (a 4x4 patch 12 levels brighter): new bytes, same picture.

    The quality stays that of the original because phash on noise textures moves by more than the threshold at
    lower qualities, unlike on real photos (docs/data.md).
    """
    pixels = np.asarray(Image.open(source)).copy()
    pixels[:4, :4] = np.clip(pixels[:4, :4].astype(int) + 12, 0, 255)
    Image.fromarray(pixels).save(target, quality=90)


@pytest.fixture(scope="module")
def duplicated(tmp_path_factory) -> Path:
    root = write_dataset(tmp_path_factory.mktemp("duplicated"), per_class=60, seed=11)
    add_copies(root)
    return root


def test_split_keeps_copies_together_stratified_and_reproducible(duplicated, tmp_path):
    out_a, out_b, out_c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    common = ["--val-fraction", str(VAL), "--test-fraction", str(TEST), "--no-progress"]
    first = run_cli("data", "split", str(duplicated), "--out", str(out_a), *common, "--cache-dir",
                    str(tmp_path / "c1"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "groups merge" in first.stdout and "largest group" in first.stdout
    again = run_cli("data", "split", str(duplicated), "--out", str(out_b), *common, "--no-cache", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert filecmp.cmp(out_a, out_b, shallow=False)  # same seed, fresh scan: byte-identical CSV
    other = run_cli("data", "split", str(duplicated), "--out", str(out_c), *common, "--seed", "7",
                    "--cache-dir", str(tmp_path / "c1"), cwd=tmp_path)
    assert other.returncode == 0 and out_c.read_bytes() != out_a.read_bytes()

    for csv_path in (out_a, out_c):
        rows = read_rows(csv_path)
        assert len(rows) == 2 * (60 + 8 + 1 + 8)
        md5s, hashes = hash_files([duplicated / row["path"] for row in rows])
        check = straddling(rows, md5s, hashes, NEAR_DUPLICATE_BITS)
        assert len(check["exact_checked"]) == 2 * 9 and len(check["near_checked"]) >= 2 * 8  # not vacuous
        assert check["exact"] == [] and check["near"] == []
        for label in ("0", "1"):
            per_split = Counter(row["split"] for row in rows if row["label"] == label)
            total = sum(per_split.values())
            largest = max(Counter(row["group"] for row in rows if row["label"] == label).values())
            for split, fraction in (("val", VAL), ("test", TEST)):
                assert abs(per_split[split] - fraction * total) <= largest, (label, per_split)


def test_split_file_is_followed_and_unknown_rows_dropped(duplicated, tmp_path, caplog):
    names = sorted(p.name for p in (duplicated / "Negative").glob("0*.jpg"))
    lines = ["path,label,split"]  # the minimal columns a user may write by hand
    for label, class_dir in enumerate(("Negative", "Positive")):
        for n, name in enumerate(names):
            lines.append(f"{class_dir}/{name},{label},{('train', 'val', 'test')[n % 3]}")
    lines += [f"Negative/{p.name},0,test" for p in sorted((duplicated / "Negative").glob("copy*.jpg"))]  # leaks
    lines.append("Positive/not_there.jpg,1,train")
    split_file = tmp_path / "mine.csv"
    split_file.write_text("\n".join(lines) + "\n")
    module = CrackDataModule(str(duplicated), split_file=str(split_file), cache_dir=str(tmp_path / "cache"),
                             progress=False, min_per_class=5)
    module.prepare()
    got = {(Path(r.path).relative_to(duplicated).as_posix(), r.label, r.split) for r in module.rows}
    expected = {(line.split(",")[0], int(line.split(",")[1]), line.split(",")[2]) for line in lines[1:-1]}
    assert got == expected
    assert all(len(r.md5) == 32 for r in module.rows)  # filled from the inventory: the cache key sees content
    assert "not_there.jpg" in caplog.text
    assert "group(s) of duplicate images in more than one split" in caplog.text
    assert module.split_summary.counts["val"] == {0: 20, 1: 20}


def test_test_root_replaces_test_split_and_drops_copies_from_training(duplicated, tmp_path, caplog):
    test_root = write_dataset(tmp_path / "held_out", per_class=10, seed=99)
    leaked = duplicated / "Positive" / "00003.jpg"
    shutil.copyfile(leaked, test_root / "Positive" / "copy_of_train.jpg")
    near_copy(duplicated / "Negative" / "00005.jpg", test_root / "Negative" / "reencoded.jpg")
    module = CrackDataModule(str(duplicated), test_root=str(test_root), cache_dir=str(tmp_path / "cache"),
                             progress=False, min_per_class=5)
    module.prepare()
    test_rows = module.rows_of("test")
    assert {Path(r.path).parent.parent for r in test_rows} == {test_root.resolve()}
    assert len(test_rows) == 22
    kept = {r.path for r in module.rows if r.split != "test"}
    # Every copy of the two leaked images (originals, byte copies and re-encodings) is out of train/val.
    md5s, hashes = hash_files([Path(p) for p in sorted(kept)] + [leaked, duplicated / "Negative" / "00005.jpg"])
    leaked_md5 = set(md5s[-2:])
    assert not leaked_md5 & set(md5s[:-2])
    distances = [[bin(int(h) ^ int(x)).count("1") for x in hashes[-2:]] for h in hashes[:-2]]
    assert min(min(d) for d in distances) > NEAR_DUPLICATE_BITS
    assert "copies of images in data.test_root" in caplog.text
    assert module.split_summary.counts["test"] == {0: 11, 1: 11}


def test_straddling_groups_counts_only_leaks(duplicated, tmp_path):
    readable = scan(duplicated, ("Negative", "Positive"), tmp_path / "inv", progress=False).readable
    rows, summary = make_split(readable, VAL, TEST, seed=3)
    assert straddling_groups(rows, readable, NEAR_DUPLICATE_BITS) == 0
    assert summary.merged_groups >= 2 * 8 and summary.largest_group >= 3  # the copies were grouped
    # Moving one member of every multi-image group to another split makes each of those groups leak.
    moved, seen = [], set()
    for row in rows:
        first = row.group not in seen
        seen.add(row.group)
        other = "test" if row.split != "test" else "train"
        moved.append(row if first else SplitRow(row.path, row.label, row.group, other, row.md5))
    assert straddling_groups(moved, readable, NEAR_DUPLICATE_BITS) == summary.merged_groups


def test_training_sample_is_fixed_and_shared_out_over_ranks(tiny_dataset, tmp_path):
    """The sample behind the final train−val gap (crackclf.train): the same rows every time, read as validation
    reads images, and under DDP split over the ranks without overlap."""
    from types import SimpleNamespace

    import torch

    module = CrackDataModule(str(tiny_dataset), image_size=32, batch_size=8, cache_dir=str(tmp_path / "cache"),
                             progress=False, min_per_class=1)
    module.setup("fit")
    train = module._datasets["train"]

    def sample(size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        batches = [module.on_after_batch_transfer(batch, 0) for batch in module.train_sample_dataloader(size)]
        return [images for images, _ in batches], [labels for _, labels in batches]

    images, labels = sample(20)
    assert sum(len(x) for x in images) == 20 and max(len(x) for x in images) <= 8
    again, _ = sample(20)
    assert all(torch.equal(a, b) for a, b in zip(images, again, strict=True))
    # Each image is one of the training split's, as validation would see it (uint8 / 255).
    pixels = train.images.float().div(255).flatten(1)
    for image, label in zip(torch.cat(images), torch.cat(labels), strict=True):
        match = (pixels - image.flatten()).abs().amax(1) == 0
        assert match.any() and bool((train.labels[match] == label).all())
    # Under DDP each rank reads every world_size-th row of the same sample: together the whole sample, once.
    rows = {}
    for rank in (0, 1):
        module.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        rows[rank] = [r for batch in module.train_sample_dataloader(20).sampler for r in batch]
    module.trainer = None
    whole = [r for batch in module.train_sample_dataloader(20).sampler for r in batch]
    assert rows[0] == whole[0::2] and rows[1] == whole[1::2]
