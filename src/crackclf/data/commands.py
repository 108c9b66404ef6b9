"""``crackclf data …``: download the published data set, verify a class-folder tree, write a leakage-free split."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from crackclf.data import inventory as inv
from crackclf.data.download import CLASS_DIRS, MENDELEY_URL, ensure_dataset
from crackclf.errors import UsageError

#: Human names of the default class folders (label order), as in conf/data/concrete_crack.yaml.
DEFAULT_CLASS_NAMES = ("no_crack", "crack")


def default_cache_dir() -> Path:
    """The cache training uses (``paths.cache_dir``): ``$CRACKCLF_CACHE``, else ``.cache/crackclf`` in the root."""
    if os.environ.get("CRACKCLF_CACHE"):
        return Path(os.environ["CRACKCLF_CACHE"])
    return Path(os.environ.get("CRACKCLF_ROOT", ".")) / ".cache" / "crackclf"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data download``, ``data verify`` and ``data split`` to the ``crackclf`` parser."""
    data = subparsers.add_parser("data", help="download, verify and split the image data")
    commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    download = commands.add_parser("download", help="fetch and extract the published data set (resumable)")
    download.add_argument("--dest", type=Path, default=Path("data"), help="download folder (default: data/)")
    download.add_argument("--url", default=None,
                          help=f"archive URL, RAR, ZIP or tar (default: $CRACKCLF_DATA_URL, else {MENDELEY_URL})")
    download.add_argument("--keep-archive", action="store_true", help="keep the archive after extraction")
    download.set_defaults(func=_download)

    verify = commands.add_parser("verify", help="decode every image; report counts, bad files and duplicates")
    _add_tree_arguments(verify)
    verify.add_argument("--out", type=Path, default=Path("reports/data"),
                        help="folder for verify.json and verify.txt (default: reports/data)")
    verify.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a file is unreadable or a duplicate crosses classes")
    verify.set_defaults(func=_verify)

    split = commands.add_parser("split", help="write the duplicate-grouped, stratified split CSV training uses")
    _add_tree_arguments(split)
    split.add_argument("--out", type=Path, default=Path("reports/data/split.csv"), help="the split CSV to write")
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--val-fraction", type=float, default=0.15)
    split.add_argument("--test-fraction", type=float, default=0.15)
    split.set_defaults(func=_split)


def _add_tree_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="data folder with one sub-folder per class")
    parser.add_argument("--class-dirs", nargs="+", default=list(CLASS_DIRS), metavar="DIR",
                        help="class sub-folders in label order (default: Negative Positive)")
    parser.add_argument("--class-names", nargs="+", default=None, metavar="NAME",
                        help="names of those classes (default: no_crack crack for the default folders)")
    parser.add_argument("--near-bits", type=int, default=inv.NEAR_DUPLICATE_BITS,
                        help=f"perceptual-hash distance of near-duplicates (default {inv.NEAR_DUPLICATE_BITS}; "
                             "-1: exact copies only)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="reuse/store the inventory here (default: $CRACKCLF_CACHE or .cache/crackclf)")
    parser.add_argument("--no-cache", action="store_true", help="decode every file again, store nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _scan(args: argparse.Namespace) -> tuple[inv.Inventory, tuple[str, ...]]:
    root: Path = args.root
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder; pass the data folder that holds {'/ and '.join(args.class_dirs)}/")
    missing = [c for c in args.class_dirs if not (root / c).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())[:10]
        raise UsageError(f"{root} has no class folder(s) {missing} (found: {found}); pass --class-dirs NEG POS")
    names = args.class_names or (DEFAULT_CLASS_NAMES if tuple(args.class_dirs) == CLASS_DIRS else args.class_dirs)
    if len(names) != len(args.class_dirs):
        raise UsageError(f"--class-names {names} must name as many classes as --class-dirs {args.class_dirs}")
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    inventory = inv.scan(root, tuple(args.class_dirs), cache_dir, progress=not args.no_progress)
    return inventory, tuple(names)


def _near_bits(args: argparse.Namespace) -> int | None:
    return None if args.near_bits < 0 else args.near_bits


def _download(args: argparse.Namespace) -> int:
    folder = ensure_dataset(args.dest, args.url, keep_archive=args.keep_archive)
    print(f"data set ready: {folder}  (train with: python train.py data.root={folder})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    inventory, names = _scan(args)
    report = inv.verify_report(inventory, names, _near_bits(args))
    json_path, text_path = inv.write_report(report, args.out)
    print(inv.format_report(report))
    print(f"\nwritten: {json_path} and {text_path}")
    conflicts = report["label_conflicts"]
    bad = report["unreadable"] or conflicts["exact"] or conflicts["near"]
    return 1 if args.strict and bad else 0


def _split(args: argparse.Namespace) -> int:
    from crackclf.data.split import make_split, write_split

    inventory, _ = _scan(args)
    if not inventory.readable:
        raise UsageError(f"{args.root} holds no readable image under {args.class_dirs}")
    rows, summary = make_split(inventory.readable, args.val_fraction, args.test_fraction, args.seed, _near_bits(args))
    write_split(args.out, rows)
    print(summary.describe())
    print(f"written: {args.out}  (train on it with: python train.py data.root={args.root.resolve()} "
          f"data.split_file={args.out.resolve()})")
    return 0
