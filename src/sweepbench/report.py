"""Comparison tables from MLflow runs, their export formats, and plots.

Runs are read only through MLflow's client API, so a report works the same against the embedded SQLite store
and a tracking server. A table groups runs by params/tags, aggregates each metric as a median with a spread
across seeds/repeats, and adds speed-up columns against a baseline group.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .config import ConfigError

EXPORT_FORMATS = ("md", "csv", "json", "html", "latex")
DEFAULT_GROUP_BY = ("model", "dataset", "device", "precision", "optimizer")
DEFAULT_METRICS = ("test_accuracy", "best_val_accuracy", "train_seconds", "samples_per_second",
                   "time_to_target_seconds", "peak_memory_mb")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "all")
SPREADS = {
    "range": lambda values: values.max() - values.min(),
    "iqr": lambda values: values.quantile(0.75) - values.quantile(0.25),
    "std": lambda values: values.std(),
}
RUN_ATTRIBUTES = ("run_id", "run_name", "experiment", "status")
SEARCH_PAGE_SIZE = 1000


def export_table(table: pd.DataFrame, fmt: str) -> str:
    """Renders a table as text in one of ``EXPORT_FORMATS``; csv and json parse back to the same numbers."""
    if fmt == "md":
        return table.to_markdown(index=False, floatfmt=".4g")
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
        return json.dumps(records, indent=2, default=_json_value)
    if fmt == "html":
        return table.to_html(index=False, float_format=lambda value: f"{value:.4g}")
    if fmt == "latex":
        return table.to_latex(index=False, float_format="%.4g")
    raise ConfigError(f"format: {fmt!r} is not allowed; choose one of: {', '.join(EXPORT_FORMATS)}")


def _json_value(value: Any) -> Any:
    """Timestamps and durations (Optuna's trial tables have both) as ISO 8601; numpy scalars as numbers."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def format_for_path(path: str | Path) -> str | None:
    """The export format a file name asks for (``.md``, ``.csv``, ``.json``, ``.html``, ``.tex``)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"tex": "latex", "markdown": "md", "htm": "html"}.get(suffix, suffix if suffix in EXPORT_FORMATS else None)


def _experiment_ids(client: Any, names: Sequence[str] | None) -> dict[str, str]:
    experiments = {experiment.experiment_id: experiment.name for experiment in client.search_experiments()}
    if not names:
        return experiments
    by_name = {name: experiment_id for experiment_id, name in experiments.items()}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ConfigError(f"experiment: {missing} not found; experiments in the store: "
                          f"{', '.join(sorted(by_name)) or 'none'}")
    return {by_name[name]: name for name in names}


def _run_row(run: Any, experiments: dict[str, str]) -> dict[str, Any]:
    row = {"run_id": run.info.run_id, "run_name": run.info.run_name,
           "experiment": experiments[run.info.experiment_id], "status": run.info.status}
    row.update({f"params.{key}": value for key, value in run.data.params.items()})
    row.update({f"tags.{key}": value for key, value in run.data.tags.items()})
    row.update({f"metrics.{key}": value for key, value in run.data.metrics.items()})
    return row


def load_runs(tracking_uri: str, experiments: Sequence[str] | None = None, filter_string: str = "",
              status: str = "FINISHED") -> pd.DataFrame:
    """One row per run: its attributes, ``params.*``, ``tags.*`` and the latest ``metrics.*``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if status not in RUN_STATUSES:
        raise ConfigError(f"status: {status!r} is not allowed; choose one of: {', '.join(RUN_STATUSES)}")
    client = MlflowClient(tracking_uri)
    experiment_names = _experiment_ids(client, experiments)
    clauses = [filter_string] if filter_string else []
    if status != "all":
        clauses.append(f"attributes.status = '{status}'")
    rows, page_token = [], None
    while True:
        try:
            page = client.search_runs(list(experiment_names), " and ".join(clauses),
                                      max_results=SEARCH_PAGE_SIZE, page_token=page_token)
        except MlflowException as exc:
            raise ConfigError(f"filter: {filter_string!r} rejected by MLflow: {exc.message}") from exc
        rows += [_run_row(run, experiment_names) for run in page]
        page_token = page.token
        if not page_token:
            return pd.DataFrame(rows)


def resolve_column(runs: pd.DataFrame, key: str) -> str:
    """The column a report key names: a run attribute or prefixed name as given, else the tag (the resolved
    device, not "auto"), the param, the metric of that name."""
    explicit = key in RUN_ATTRIBUTES or key.startswith(("params.", "tags.", "metrics."))
    for column in [key] if explicit else [f"tags.{key}", f"params.{key}", f"metrics.{key}"]:
        if column in runs.columns:
            return column
    available = sorted({column.split(".", 1)[-1] for column in runs.columns})
    raise ConfigError(f"no param, tag or metric named {key!r} in the selected runs; available: "
                      f"{', '.join(available)}")


def _metric_columns(runs: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        return [metric for metric in DEFAULT_METRICS if f"metrics.{metric}" in runs.columns]
    for metric in metrics:
        if f"metrics.{metric}" not in runs.columns:
            available = sorted(column[len("metrics."):] for column in runs.columns if column.startswith("metrics."))
            raise ConfigError(f"metric: {metric!r} not logged by the selected runs; available: {', '.join(available)}")
    return list(metrics)


def is_duration(metric: str) -> bool:
    return metric.endswith("_seconds")


def is_throughput(metric: str) -> bool:
    return metric.endswith("_per_second")


def parse_baseline(spec: str) -> dict[str, str]:
    """``"device=cpu,precision=fp32"`` -> ``{"device": "cpu", "precision": "fp32"}``."""
    baseline = {}
    for pair in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"baseline: expected KEY=VALUE[,KEY=VALUE...], got {spec!r}")
        baseline[key.strip()] = value.strip()
    return baseline


def per_run_frame(runs: pd.DataFrame, group_by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """The group-by keys (as text, "-" where a run lacks one) and metric values of every run."""
    frame = pd.DataFrame({key: runs[resolve_column(runs, key)].fillna("-").astype(str) for key in group_by})
    for metric in metrics:
        frame[metric] = pd.to_numeric(runs[f"metrics.{metric}"], errors="coerce")
    return frame


def comparison_table(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY,
                     metrics: Sequence[str] | None = None, spread: str = "range",
                     baseline: dict[str, str] | None = None) -> pd.DataFrame:
    """Groups runs by ``group_by`` keys: a ``runs`` count, each metric's median and spread, and speed-ups of
    every duration/throughput metric against the baseline group (the first group when none is given)."""
    if runs.empty:
        raise ConfigError("no runs match the selection")
    if spread not in SPREADS:
        raise ConfigError(f"spread: {spread!r} is not allowed; choose one of: {', '.join(SPREADS)}")
    group_by, metrics = list(group_by), _metric_columns(runs, metrics)
    grouped = per_run_frame(runs, group_by, metrics).groupby(group_by, sort=True)
    table = grouped.size().rename("runs").to_frame()
    for metric in metrics:
        table[f"{metric}_median"] = grouped[metric].median()
        table[f"{metric}_{spread}"] = grouped[metric].agg(SPREADS[spread])
    table = table.reset_index()
    speed_metrics = [metric for metric in metrics if is_duration(metric) or is_throughput(metric)]
    return add_speedups(table, group_by, speed_metrics, baseline)


def _baseline_rows(table: pd.DataFrame, group_by: Sequence[str], baseline: dict[str, str] | None) -> pd.DataFrame:
    if not baseline:
        return table.iloc[:1]
    unknown = sorted(set(baseline) - set(group_by))
    if unknown:
        raise ConfigError(f"baseline: {unknown} not among the group-by keys {', '.join(group_by)}")
    selected = table
    for key, value in baseline.items():
        selected = selected[selected[key] == value]
    if selected.empty:
        choices = "; ".join(f"{key}: {', '.join(sorted(table[key].unique()))}" for key in baseline)
        raise ConfigError(f"baseline: no group matches {baseline}; values present: {choices}")
    return selected


def add_speedups(table: pd.DataFrame, group_by: Sequence[str], metrics: Sequence[str],
                 baseline: dict[str, str] | None = None) -> pd.DataFrame:
    """Adds ``<metric>_speedup`` (baseline time / time, or throughput / baseline throughput) to each row.

    The baseline names some group-by keys; rows are compared with the baseline row that shares their other
    keys, so ``device=cpu`` gives every model and precision its own CPU reference."""
    if not metrics:
        return table
    reference = _baseline_rows(table, group_by, baseline)
    shared = [key for key in group_by if baseline and key not in baseline]
    reference = reference[shared + [f"{metric}_median" for metric in metrics]].rename(
        columns={f"{metric}_median": f"{metric}_reference" for metric in metrics})
    merged = table.merge(reference, on=shared, how="left") if shared else table.merge(reference, how="cross")
    for metric in metrics:
        median, base = merged[f"{metric}_median"], merged.pop(f"{metric}_reference")
        merged.insert(merged.columns.get_loc(median.name) + 2, f"{metric}_speedup",
                      base / median if is_duration(metric) else median / base)
    return merged


def _figure(width: float = 6.4, height: float = 4.8) -> tuple[Any, Any]:
    """A figure drawn off-screen (Agg), so plots work on a headless machine and never open a window.
    Margins are set by hand: an automatic layout engine doubles the time to render a run's plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(width, height))
    figure.subplots_adjust(left=0.12, right=0.88, bottom=0.12, top=0.92)
    return figure, axes


def plot_learning_curve(history: Sequence[Any]) -> Any:
    """Losses and validation accuracy per epoch from a run's ``EpochRecord`` history."""
    figure, loss_axes = _figure()
    epochs = [record.epoch for record in history]
    loss_axes.plot(epochs, [r.train_loss for r in history], marker="o", label="train loss")
    loss_axes.plot(epochs, [r.val_loss for r in history], marker="o", label="val loss")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("cross-entropy loss")
    accuracy_axes = loss_axes.twinx()
    accuracy_axes.plot(epochs, [r.val_accuracy for r in history], marker="s", color="tab:green",
                       label="val accuracy")
    accuracy_axes.set_ylabel("validation accuracy")
    handles = loss_axes.get_legend_handles_labels()[0] + accuracy_axes.get_legend_handles_labels()[0]
    loss_axes.legend(handles=handles, loc="center right")
    loss_axes.set_title("Learning curve")
    return figure


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> Any:
    """Counts of (true class, predicted class) on the test set, shaded by row share."""
    import numpy as np

    counts = np.asarray(matrix)
    figure, axes = _figure(7, 6)
    figure.subplots_adjust(left=0.16, right=0.98, bottom=0.17)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    axes.set_xticks(ticks, classes, rotation=45, ha="right")
    axes.set_yticks(ticks, classes)
    for (row, column), count in np.ndenumerate(counts):
        axes.text(column, row, str(count), ha="center", va="center", fontsize=7,
                  color="white" if shares[row, column] > 0.5 else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion matrix (test set)")
    figure.colorbar(image, ax=axes, label="share of the true class")
    return figure


def group_labels(frame: pd.DataFrame, group_by: Sequence[str]) -> pd.Series:
    return frame[list(group_by)].astype(str).agg(" / ".join, axis=1)


def plot_accuracy_vs_time(frame: pd.DataFrame, group_by: Sequence[str], accuracy_metric: str,
                          time_metric: str) -> Any:
    """Every run as a dot, each group's median as a labelled diamond: up and to the left is better."""
    figure, axes = _figure(8, 5.5)
    figure.subplots_adjust(right=0.62)
    labels = group_labels(frame, group_by)
    for label in sorted(labels.unique()):
        group = frame[labels == label]
        dots = axes.scatter(group[time_metric], group[accuracy_metric], alpha=0.45, s=20)
        axes.scatter(group[time_metric].median(), group[accuracy_metric].median(), marker="D", s=70,
                     color=dots.get_facecolor()[0], edgecolor="black", label=f"{label} (n={len(group)})")
    axes.set_xlabel(f"{time_metric} (lower is better)")
    axes.set_ylabel(f"{accuracy_metric} (higher is better)")
    axes.set_title(f"{accuracy_metric} vs {time_metric}: runs (dots), group medians (diamonds)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, title=" / ".join(group_by),
                title_fontsize=8)
    return figure


def plot_speedups(table: pd.DataFrame, group_by: Sequence[str], metric: str) -> Any:
    """One bar per group: its speed-up in ``metric`` over the baseline, with the baseline at 1x."""
    labels = group_labels(table, group_by)
    speedups = table[f"{metric}_speedup"]
    height = 1.5 + 0.4 * len(table)
    figure, axes = _figure(8, height)
    figure.subplots_adjust(left=0.4, right=0.92, bottom=0.7 / height, top=1 - 0.5 / height)
    bars = axes.barh(range(len(table)), speedups.fillna(0),
                     color=["tab:green" if value >= 1 else "tab:red" for value in speedups.fillna(0)])
    axes.bar_label(bars, labels=["n/a" if math.isnan(value) else f"{value:.2f}x" for value in speedups],
                   padding=3, fontsize=8)
    axes.set_yticks(range(len(table)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.axvline(1, color="black", linewidth=1)
    axes.set_xlabel(f"speed-up in {metric} over the baseline (x)")
    axes.set_title(f"Speed-up ({metric})")
    return figure


def write_plots(runs: pd.DataFrame, table: pd.DataFrame, group_by: Sequence[str], directory: str | Path,
                accuracy_metric: str = "test_accuracy", time_metric: str = "train_seconds") -> list[Path]:
    """Writes ``accuracy_vs_time.png`` and, when the table has speed-ups in ``time_metric``, ``speedup.png``."""
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frame = per_run_frame(runs, group_by, _metric_columns(runs, [accuracy_metric, time_metric]))
    figures = {"accuracy_vs_time.png": plot_accuracy_vs_time(frame, group_by, accuracy_metric, time_metric)}
    if f"{time_metric}_speedup" in table.columns:
        figures["speedup.png"] = plot_speedups(table, group_by, time_metric)
    written = []
    for name, figure in figures.items():
        figure.savefig(directory / name, dpi=110)
        plt.close(figure)
        written.append(directory / name)
    return written
