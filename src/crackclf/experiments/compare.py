"""Training runs from MLflow → a markdown comparison table and a PNG overlaying their validation-accuracy curves.

Runs are selected by experiment, optionally by sweep id (the ``sweep_id`` tag every sweep job carries) and by any
``key=value`` tags. Sweep parent runs are never rows: they hold no training. With a sweep, both files are also
logged to the sweep's parent run (under ``compare/``), so the MLflow UI shows the comparison next to the sweep.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crackclf.errors import UsageError
from crackclf.experiments.sweep import ROLE_TAG, format_overrides, override_params, short_value, varying_keys
from crackclf.tracking import mlflow as tracking

#: Columns of the table: (header, how to get the value from a run row).
METRIC_COLUMNS = (
    ("val acc", "val/acc"),
    ("test acc", "test/acc"),
    ("test F1", "test/f1"),
    ("test AUROC", "test/auroc"),
    ("train−val gap", "train_val_gap"),
)
PARAM_COLUMNS = (("lr", "optimizer.lr"), ("wd", "optimizer.weight_decay"), ("img", "data.image_size"),
                 ("batch", "data.batch_size"))


@dataclass
class RunRow:
    """One training run, as the comparison shows it."""

    run_id: str
    name: str
    status: str
    backbone: str
    overrides: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    wall_s: float | None
    curve: list[float] = field(default_factory=list)  # val/acc after each training epoch


@dataclass
class Comparison:
    """What :func:`compare` wrote."""

    table: Path
    plot: Path
    rows: list[RunRow]
    plotted: list[str]  # run ids with a curve in the PNG, in legend order
    parent_run_id: str | None


def _quote(value: str) -> str:
    """A value for an MLflow filter string."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UsageError(f"tag value {value!r} contains both quote characters; MLflow filters cannot express it.")


def parse_tags(items: list[str]) -> dict[str, str]:
    """``["backbone=resnet18"]`` → ``{"backbone": "resnet18"}``, with a clear error for a malformed item."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag {item!r} must be KEY=VALUE, e.g. --tag backbone=resnet18")
        tags[key] = value
    return tags


def latest_sweep(experiment: str) -> str:
    """The id of the most recently started sweep in ``experiment``."""
    parents = tracking.search_runs([experiment], f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1)
    if not parents:
        raise UsageError(f"experiment {experiment!r} has no sweeps yet (run `python train.py -m ...` first), "
                         "or leave out --sweep to compare all its runs.")
    return parents[0].data.tags["sweep_id"]


def find_runs(experiment: str, sweep: str | None = None, tags: dict[str, str] | None = None,
              max_runs: int = 50) -> tuple[list[Any], Any | None]:
    """(training runs, sweep parent run or ``None``) matching the filters, newest first."""
    known = tracking.experiment_names()
    if experiment not in known:
        raise UsageError(f"no MLflow experiment {experiment!r} at {tracking.tracking_uri()} "
                         f"(experiments there: {', '.join(known) or 'none'}); pass --experiment NAME.")
    clauses = [f"tags.`{key}` = {_quote(value)}" for key, value in (tags or {}).items()]
    if sweep:
        clauses.append(f"tags.sweep_id = {_quote(sweep)}")
    found = tracking.search_runs([experiment], " and ".join(clauses), max_results=max_runs + 1000)
    parent = next((r for r in found if r.data.tags.get(ROLE_TAG) == "sweep"), None) if sweep else None
    runs = [r for r in found if r.data.tags.get(ROLE_TAG) != "sweep"][:max_runs]
    if not runs:
        where = f"experiment {experiment!r}" + (f", sweep {sweep!r}" if sweep else "") + (
            f", tags {tags}" if tags else "")
        raise UsageError(f"no training runs match {where} at {tracking.tracking_uri()}.")
    return runs, parent


def _row(run: Any) -> RunRow:
    data, info = run.data, run.info
    epochs = int(data.metrics.get("epochs_run", 0) or 0)
    # val/acc is logged after every epoch, then once more by the final validation of the best checkpoint.
    history = [value for _, value in tracking.metric_history(info.run_id, "val/acc")]
    curve = history[:epochs] if epochs else history
    wall = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    return RunRow(
        run_id=info.run_id, name=info.run_name or info.run_id[:8], status=info.status,
        backbone=data.tags.get("backbone") or data.params.get("backbone.name", "?"),
        overrides=override_params(data.tags.get("overrides", "")), params=dict(data.params),
        metrics=dict(data.metrics), wall_s=wall, curve=curve,
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return short_value(str(value))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render_table(rows: list[RunRow], title: str) -> str:
    """The markdown comparison: one row per run, best validation accuracy first."""
    swept = varying_keys([row.overrides for row in rows])
    headers = ["run", "status", "backbone", "overrides", *[h for h, _ in PARAM_COLUMNS],
               *[h for h, _ in METRIC_COLUMNS], "epochs", "wall time", "images/s"]
    lines = [f"# {title}", "", f"{len(rows)} runs, sorted by validation accuracy.", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        overrides = format_overrides(row.overrides, swept)
        cells = [
            f"{row.name} ({row.run_id[:8]})", row.status, row.backbone, f"`{overrides}`" if overrides else "-",
            *[_fmt(row.params.get(key)) for _, key in PARAM_COLUMNS],
            *[_fmt(row.metrics.get(key)) for _, key in METRIC_COLUMNS],
            _fmt(int(row.metrics["epochs_run"]) if "epochs_run" in row.metrics else None),
            _duration(row.wall_s), _fmt(row.metrics.get("train/images_per_s"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[RunRow], out: Path, title: str) -> list[str]:
    """Overlay the validation-accuracy curves (one line per run that has one); returns the plotted run ids.

    The ids are also written into the PNG's ``crackclf.curves`` text chunk, read back from the drawn lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = varying_keys([row.overrides for row in rows])
    figure, axis = plt.subplots(figsize=(9, 5))
    for row in rows:
        if not row.curve:
            continue
        label = format_overrides(row.overrides, swept) or row.name
        epochs = range(1, len(row.curve) + 1)
        axis.plot(epochs, row.curve, marker="o", markersize=3, label=f"{label} [{row.run_id[:6]}]", gid=row.run_id)
    plotted = [line.get_gid() for line in axis.get_lines()]
    axis.set_xlabel("epoch")
    axis.set_ylabel("val/acc")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.xaxis.get_major_locator().set_params(integer=True)
    if plotted:  # below the axes: sweep labels are long and would hide the curves
        axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12),
                    ncol=1 if len(plotted) < 8 else 2)
    else:
        axis.text(0.5, 0.5, "no validation curves logged", ha="center", va="center", transform=axis.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, bbox_inches="tight", metadata={"crackclf.curves": json.dumps(plotted)})
    plt.close(figure)
    return plotted


def compare(experiment: str, out: Path, sweep: str | None = None, tags: dict[str, str] | None = None,
            max_runs: int = 50) -> Comparison:
    """Write ``<out>/compare-<sweep or experiment>.md`` and ``.png``; log both to the sweep's parent run."""
    if sweep == "latest":
        sweep = latest_sweep(experiment)
    runs, parent = find_runs(experiment, sweep, tags, max_runs)
    rows = sorted((_row(run) for run in runs), key=lambda r: -r.metrics.get("val/acc", float("-inf")))
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", sweep or experiment)
    title = f"sweep {sweep}" if sweep else f"experiment {experiment}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / f"compare-{label}.md"
    plot = out / f"compare-{label}.png"
    table.write_text(render_table(rows, title))
    plotted = plot_curves(rows, plot, f"validation accuracy — {title}")
    parent_id = parent.info.run_id if parent is not None else None
    if parent_id:
        tracking.log_artifact(parent_id, table, "compare")
        tracking.log_artifact(parent_id, plot, "compare")
    return Comparison(table=table, plot=plot, rows=rows, plotted=plotted, parent_run_id=parent_id)
