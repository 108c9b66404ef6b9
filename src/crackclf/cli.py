"""`crackclf` command line: one sub-command family per workflow stage, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from crackclf.errors import CrackclfError
from crackclf.utils import keep_freed_memory

#: Modules that each define ``register(subparsers)``; a sub-command stores its handler in ``func``.
COMMAND_MODULES = (
    "crackclf.data.commands",
    "crackclf.inference.commands",
    "crackclf.serving.commands",
    "crackclf.experiments.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crackclf", description="Concrete crack classifiers: data, evaluation, "
                                     "prediction, export, serving, comparison. Train with `python train.py`.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name:  # that stage has no commands yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; bad input gives a one-line message and exit status 2 (``--debug`` shows tracebacks)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    keep_freed_memory()  # inference allocates the same batch-sized tensors over and over, like training
    try:
        return int(args.func(args) or 0)
    except CrackclfError as error:  # bad input, named with its fix; any other exception is a bug: traceback
        if args.debug or os.environ.get("CRACKCLF_DEBUG"):
            traceback.print_exc()
        print(f"crackclf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
