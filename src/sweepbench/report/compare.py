"""Grouped comparisons that refuse to mislead: one implementation for ``report`` and ``bench``.

A comparison groups runs by keys, gives each metric's median, a spread and a 95% confidence interval of the
mean over the group's runs, and speed-ups against a baseline group. Three rules keep a row honest:

- **Comparable runs only.** When runs in one row differ in a setting that changes what is measured (dataset,
  epochs, batch size, training subset, device, precision, ...) and that is not grouped by, the rows are split by
  it and a note names it. Other settings that differ within a row (learning rates across study trials, say)
  are named in a note: the medians pool those runs.
- **A stated baseline.** The user names it, or the default rule picks ``device=cpu``, ``precision=fp32``,
  ``loader=torchvision``, ``compile=False``, ``step=eager`` for the keys that vary; the choice is printed. Each
  row is compared with the baseline row that shares its other keys.
- **No silent gaps.** A row without a baseline row gets no speed-up, and a note names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from ..devices import baseline_device
from ..precisions import baseline_precision
from ..steps import step_choices
from ..validators import ConfigError, choice
from ..tracking.schema import FUSED_TAG
from .runs import has_key, run_values

DEFAULT_GROUP_BY = ("model", "dataset", "device", "precision", "optimizer")
DEFAULT_METRICS = ("test_accuracy", "best_val_accuracy", "train_seconds", "samples_per_second",
                   "time_to_target_seconds", "peak_memory_mb")
# The table for people (``compact_view``): the objective with its interval, the time with its speed-up.
COMPACT_COLUMNS = ("test_accuracy_median", "test_accuracy_ci95_low", "test_accuracy_ci95_high",
                   "train_seconds_median", "train_seconds_speedup")
SPREADS = {
    "range": lambda values: values.max() - values.min(),
    "iqr": lambda values: values.quantile(0.75) - values.quantile(0.25),
    "std": lambda values: values.std(),
}
# Settings that change what a run measures: runs that differ in one are never pooled in a row.
SPLIT_SETTINGS = ("dataset", "model", "epochs", "batch_size", "train_subset", "val_size", "device", "precision",
                  "loader", "compile", "step", "augment", FUSED_TAG)  # a fused run's epoch times are its pack's
# Settings whose differences do not change what is measured, or that differ between repeats by design.
POOLED_SETTINGS = ("seed", "data_dir", "download", "checkpoint_dir", "resume", "eval_batch_size")
DEFAULT_BASELINE = (("device", baseline_device()), ("precision", baseline_precision()), ("loader", "torchvision"),
                    ("compile", "False"), ("step", step_choices()[0]))
CONFIDENCE = 0.95
CI_NOTE = "ci95_low/high: 95% confidence interval of the mean over a row's runs (Student t); empty for one run"


def is_duration(metric: str) -> bool:
    return metric.endswith("_seconds")


def is_throughput(metric: str) -> bool:
    return metric.endswith("_per_second")


@dataclass
class Comparison:
    """A comparison ``table`` (one row per group), the keys it is grouped by (splits included), each run's
    group keys and metric values (``runs``), the baseline it was compared with, and notes to print with it."""

    table: pd.DataFrame
    group_by: list[str]
    runs: pd.DataFrame
    baseline: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)


def parse_baseline(spec: str) -> dict[str, str]:
    """``"device=cpu,precision=fp32"`` -> ``{"device": "cpu", "precision": "fp32"}``."""
    baseline = {}
    for pair in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"baseline: expected KEY=VALUE[,KEY=VALUE...], got {spec!r}")
        baseline[key.strip()] = value.strip()
    return baseline


def metric_names(runs: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    logged = sorted(column[len("metrics."):] for column in runs.columns if column.startswith("metrics."))
    if metrics is None:
        return [metric for metric in DEFAULT_METRICS if metric in logged]
    for metric in metrics:
        if metric not in logged:
            raise ConfigError(f"metric: {metric!r} not logged by the selected runs; available: {', '.join(logged)}")
    return list(metrics)


def per_run_frame(runs: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Each run's keys (as text) and metric values."""
    frame = pd.DataFrame({key: run_values(runs, key) for key in keys}, index=runs.index)
    for metric in metrics:
        frame[metric] = pd.to_numeric(runs[f"metrics.{metric}"], errors="coerce")
    return frame


def _varying_within_groups(frame: pd.DataFrame, keys: list[str], values: pd.Series) -> bool:
    return bool((values.groupby([frame[key] for key in keys]).nunique(dropna=False) > 1).any())


def _splits(runs: pd.DataFrame, frame: pd.DataFrame, group_by: list[str]) -> list[str]:
    return [setting for setting in SPLIT_SETTINGS if setting not in group_by and has_key(runs, setting)
            and _varying_within_groups(frame, group_by, run_values(runs, setting))]


def _pooled_settings(runs: pd.DataFrame, frame: pd.DataFrame, keys: list[str]) -> list[str]:
    params = [column[len("params."):] for column in runs.columns if column.startswith("params.")]
    candidates = [name for name in params if name not in keys and name not in POOLED_SETTINGS
                  and name not in SPLIT_SETTINGS]
    return [name for name in sorted(candidates)
            if _varying_within_groups(frame, keys, runs[f"params.{name}"].fillna("-"))]


def _mean_interval(values: pd.Series) -> tuple[float, float]:
    from scipy import stats  # here, not at the top: a `train` run imports this package for its plots (0.5 s)

    values = values.dropna()
    if len(values) < 2:
        return math.nan, math.nan
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * values.std() / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def _aggregate(frame: pd.DataFrame, keys: list[str], metrics: list[str], spread: str) -> pd.DataFrame:
    grouped = frame.groupby(keys, sort=True)
    table = grouped.size().rename("runs").to_frame()
    for metric in metrics:
        table[f"{metric}_median"] = grouped[metric].median()
        table[f"{metric}_{spread}"] = grouped[metric].agg(SPREADS[spread])
        intervals = grouped[metric].agg(_mean_interval)
        table[f"{metric}_ci95_low"] = [low for low, _ in intervals]
        table[f"{metric}_ci95_high"] = [high for _, high in intervals]
    return table.reset_index()


def default_baseline(table: pd.DataFrame, keys: Sequence[str]) -> dict[str, str] | None:
    """The default rule: for each of ``DEFAULT_BASELINE``'s keys that is grouped by and varies across rows,
    its reference value when some row has it; None when no key qualifies."""
    baseline = {key: value for key, value in DEFAULT_BASELINE
                if key in keys and table[key].nunique() > 1 and (table[key] == value).any()}
    return baseline or None


def _check_baseline(table: pd.DataFrame, keys: Sequence[str], baseline: dict) -> None:
    unknown = sorted(set(baseline) - set(keys))
    if unknown:
        raise ConfigError(f"baseline: {unknown} not among the group-by keys {', '.join(keys)}")
    selected = table
    for key, value in baseline.items():
        selected = selected[selected[key] == value]
    if selected.empty:
        choices = "; ".join(f"{key}: {', '.join(sorted(map(str, table[key].unique())))}" for key in baseline)
        raise ConfigError(f"baseline: no group matches {baseline}; values present: {choices}")


def add_comparisons(table: pd.DataFrame, keys: Sequence[str], baseline: dict,
                    ratios: Sequence[tuple[str, str, bool]] = (),
                    deltas: Sequence[tuple[str, str]] = ()) -> tuple[pd.DataFrame, pd.Series]:
    """Compares every row with its baseline row: the row whose ``baseline`` keys hold the baseline's values and
    whose other ``keys`` equal its own. ``ratios``: (column, new column, lower is better) adds the baseline's
    value over the row's (a speed-up, for times) or the row's over the baseline's (for throughputs);
    ``deltas``: (column, new column) adds the row's value minus the baseline's. Returns the table and, per row,
    whether it has a baseline row."""
    _check_baseline(table, keys, baseline)
    shared = [key for key in keys if key not in baseline]
    columns = sorted({column for column, _, _ in ratios} | {column for column, _ in deltas})
    reference = table
    for key, value in baseline.items():
        reference = reference[reference[key] == value]
    reference = reference[shared + columns].rename(columns={column: f"{column}@baseline" for column in columns})
    reference["has_baseline"] = True
    merged = table.merge(reference, on=shared, how="left") if shared else table.merge(reference, how="cross")
    for column, name, lower_is_better in ratios:
        base, own = merged[f"{column}@baseline"], merged[column]
        merged[name] = base / own if lower_is_better else own / base
    for column, name in deltas:
        merged[name] = merged[column] - merged[f"{column}@baseline"]
    merged = merged.drop(columns=[f"{column}@baseline" for column in columns])
    has_baseline = merged.pop("has_baseline").eq(True)
    return merged, has_baseline


def _describe_row(row: pd.Series, keys: Sequence[str]) -> str:
    return ", ".join(f"{key}={row[key]}" for key in keys)


def compare_runs(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY, metrics: Sequence[str] | None = None,
                 spread: str = "range", baseline: dict[str, str] | None = None) -> Comparison:
    """The comparison table of ``runs`` grouped by ``group_by`` (see the module docstring for its rules)."""
    if runs.empty:
        raise ConfigError("no runs match the selection")
    choice("spread", spread, tuple(SPREADS))
    group_by, metrics, notes = list(group_by), metric_names(runs, metrics), []
    experiments = runs["experiment"].nunique() if "experiment" in runs else 1
    if experiments > 1 and "experiment" not in group_by:
        group_by.insert(0, "experiment")
        notes.append(f"rows by experiment: the runs come from {experiments} experiments (a study's are its own)")
    frame = per_run_frame(runs, group_by, metrics)
    splits = _splits(runs, frame, group_by)
    if splits:
        frame = pd.concat([frame, pd.DataFrame({key: run_values(runs, key) for key in splits})], axis=1)
        notes.append(f"rows split by {', '.join(splits)}: runs in one group differ in it (group by it to "
                     "choose its place)")
    keys = group_by + splits
    pooled = _pooled_settings(runs, frame, keys)
    if pooled:
        notes.append(f"rows pool runs that differ in {', '.join(pooled)}: the medians are over those runs")
    table = _aggregate(frame, keys, metrics, spread)
    notes.append(CI_NOTE)
    comparison = Comparison(table, keys, frame[keys + metrics], baseline, notes)
    _add_speedups(comparison, [metric for metric in metrics if is_duration(metric) or is_throughput(metric)])
    return comparison


def compact_view(comparison: Comparison) -> pd.DataFrame:
    """The comparison as a person reads it first: its keys, runs, the test accuracy's median with its 95%
    interval, the training time's median and speed-up (``COMPACT_COLUMNS``, those the table has). ``--metrics``
    and the csv and json formats give every column."""
    shown = [*comparison.group_by, "runs", *(column for column in COMPACT_COLUMNS if column in comparison.table)]
    return comparison.table[shown]


def _add_speedups(comparison: Comparison, metrics: list[str]) -> None:
    if not metrics:
        return
    table, keys = comparison.table, comparison.group_by
    if comparison.baseline is None:
        comparison.baseline = default_baseline(table, keys)
        if comparison.baseline is None:
            rule = ", ".join(f"{key}={value}" for key, value in DEFAULT_BASELINE)
            comparison.notes.append(f"no speed-ups: the default baseline ({rule}) does not apply to these rows; "
                                    "name one with --baseline KEY=VALUE")
            return
        rule = "the default rule"
    else:
        rule = "as asked"
    ratios = [(f"{metric}_median", f"{metric}_speedup", is_duration(metric)) for metric in metrics]
    comparison.table, has_baseline = add_comparisons(table, keys, comparison.baseline, ratios)
    shown = ", ".join(f"{key}={value}" for key, value in comparison.baseline.items())
    comparison.notes.insert(0, f"baseline: {shown} ({rule}); speed-up = baseline median time / row median time")
    orphans = [_describe_row(row, keys) for _, row in comparison.table[~has_baseline].iterrows()]
    if orphans:
        comparison.notes.append(f"no speed-up for {len(orphans)} row(s) without a baseline row sharing their "
                                f"other keys: {'; '.join(orphans)}")
