"""`crackclf compare`: registered into the CLI by crackclf.cli."""

from __future__ import annotations

import argparse
from pathlib import Path

from crackclf.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    parser = subparsers.add_parser(
        "compare", help="compare training runs from MLflow: markdown table + validation-accuracy curves",
        description="Read runs from MLflow (by experiment, sweep id and tags) and write compare-<name>.md (backbone, "
        "key params, val/test accuracy, F1, AUROC, train-val gap, epochs, wall time, images/s) and compare-<name>.png "
        "(validation-accuracy curves). With --sweep both are also logged to the sweep's parent run.",
    )
    parser.add_argument("--experiment", default="crack", help="MLflow experiment name (default: crack)")
    parser.add_argument("--sweep", default=None, metavar="ID",
                        help="only the jobs of this sweep (its id is printed at the end of a sweep), or 'latest'")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs with this tag value (repeatable), e.g. --tag backbone=resnet18")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports/)")
    parser.add_argument("--max-runs", type=int, default=50, help="newest runs to include (default: 50)")
    parser.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from crackclf.experiments.compare import compare, parse_tags

    if args.max_runs < 1:
        raise UsageError(f"--max-runs {args.max_runs} must be >= 1.")
    result = compare(args.experiment, args.out, sweep=args.sweep, tags=parse_tags(args.tag), max_runs=args.max_runs)
    print(result.table.read_text())
    print(f"table:  {result.table}\ncurves: {result.plot} ({len(result.plotted)} runs)")
    if result.parent_run_id:
        print(f"logged to sweep parent run {result.parent_run_id} (artifacts compare/)")
    return 0
