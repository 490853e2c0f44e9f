"""Reading a study back: the best trial, the comparison table, parameter importances, the bookkeeping share, and
what ``sweepbench study show`` and ``sweepbench study export`` print."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from .coordination import FINISHED, Tally
from .identity import VERSION_ATTR
from .storage import ERROR_ATTR, _quiet

CHECKPOINT_COLUMN = "user_attrs_checkpoint"  # a trial's best.pt, as study.trial records it

log = logging.getLogger(__name__)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial; for a Pareto study, the front's best on the first objective."""
    candidates = study.best_trials if len(study.directions) > 1 else study.get_trials(states=(TrialState.COMPLETE,))
    if not candidates:
        return None
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(candidates, key=lambda trial: sign * trial.values[0])


STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3,
               TrialState.FAIL: 4}


def _rank_key(study: optuna.Study, trial: FrozenTrial) -> tuple[int, float]:
    """Best first: COMPLETE by the first objective, then PRUNED by their last reported value, then the rest."""
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    if trial.values:
        value = trial.values[0]
    elif trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
    else:
        value = math.inf * -sign
    return STATE_ORDER[trial.state], sign * value


def metric_names(study: optuna.Study) -> list[str]:
    return study.metric_names or [f"value_{index}" for index in range(len(study.directions))]


def trials_table(study: optuna.Study, limit: int | None = None) -> pd.DataFrame:
    """The comparison table, best trial first: state, objective values, parameters, epochs, seconds, error."""
    names = metric_names(study)
    versioned = study.user_attrs.get(VERSION_ATTR, 1) > 1  # a changed spec: which version each trial ran under
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: _rank_key(study, t))[:limit or None]:
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        if versioned:
            row[VERSION_ATTR] = trial.user_attrs.get(VERSION_ATTR)
        row.update(zip(names, trial.values or [None] * len(names)))
        row.update(trial.params)
        row["epochs"] = trial.user_attrs.get("epochs_run", len(trial.intermediate_values))
        row["seconds"] = trial.duration.total_seconds() if trial.duration else None
        row["error"] = trial.user_attrs.get(ERROR_ATTR, "")
        rows.append(row)
    return pd.DataFrame(rows)


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Each parameter's importance for the first objective, by Optuna's default evaluator; empty while the
    study has too few COMPLETE trials to tell."""
    target = (lambda trial: trial.values[0]) if len(study.directions) > 1 else None
    try:
        with _quiet():
            return optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError) as exc:
        log.warning(f"parameter importances unavailable: {exc}")
        return {}


@dataclass(frozen=True)
class Bookkeeping:
    """Time the finished trials spent outside the engine, as shares of their durations (ask to tell): in all
    (``total``: Optuna's sampler, pruner and storage, and MLflow) and MLflow's part (``tracking``; None for
    trials recorded before it was)."""

    total: float
    tracking: float | None

    def line(self) -> str:
        text = f"bookkeeping (Optuna + MLflow): {100 * self.total:.1f}% of trial time"
        if self.tracking is None:
            return text
        return (f"{text}: MLflow tracking {100 * self.tracking:.1f}%, Optuna (sampler, pruner, storage) "
                f"{100 * (self.total - self.tracking):.1f}%")


def bookkeeping_share(study: optuna.Study) -> Bookkeeping | None:
    """The finished trials' bookkeeping shares, or None before any trial recorded its engine time."""
    timed = [trial for trial in study.get_trials(deepcopy=False, states=FINISHED)
             if "engine_seconds" in trial.user_attrs and trial.duration]
    total = sum(trial.duration.total_seconds() for trial in timed)
    if not total:
        return None
    engine_seconds = sum(trial.user_attrs["engine_seconds"] for trial in timed)
    tracked = all("tracking_seconds" in trial.user_attrs for trial in timed)
    tracking = sum(trial.user_attrs["tracking_seconds"] for trial in timed) / total if tracked else None
    return Bookkeeping(1 - engine_seconds / total, tracking)


def describe_study(study: optuna.Study, limit: int = 10) -> str:
    """Counts, the best trial, the bookkeeping share and the comparison table (markdown)."""
    from ..report import export_table

    tally = Tally.of(study.get_trials(deepcopy=False))
    lines = [f"study {study.study_name}: {tally.finished} finished trials, {tally.failed} failed, "
             f"{tally.running} running"]
    best = best_trial(study)
    if best is not None:
        values = ", ".join(f"{name} {value:.4f}" for name, value in zip(metric_names(study), best.values))
        lines.append(f"best trial #{best.number}: {values}; {best.params}{_version_note(study, best)}")
    share = bookkeeping_share(study)
    if share is not None:
        lines.append(share.line())
    table = trials_table(study, limit)
    if not table.empty:
        lines += ["", export_table(table, "md")]
    left_out = len(study.get_trials(deepcopy=False)) - len(table)
    if left_out > 0:
        lines.append(f"... and {left_out} more trial(s) not shown (--limit 0 shows all)")
    return "\n".join(lines)


def _version_note(study: optuna.Study, trial: FrozenTrial) -> str:
    """For a study whose spec changed: the spec version the trial ran under, and a warning when it is not the
    latest (the current spec may not be able to produce it)."""
    latest = study.user_attrs.get(VERSION_ATTR, 1)
    if latest == 1:
        return ""
    version = trial.user_attrs.get(VERSION_ATTR)
    stale = "" if version == latest else f", not the latest {latest}: the current spec may not produce it"
    return f" (spec version {version}{stale})"


def describe_importances(study: optuna.Study) -> str:
    importances = param_importances(study)
    if not importances:
        return "parameter importance: not enough COMPLETE trials yet"
    width = max(len(name) for name in importances)
    rows = [f"  {name:<{width}}  {value:.3f}" for name, value in importances.items()]
    return "\n".join([f"parameter importance for {metric_names(study)[0]}:", *rows])


def export_trials(study: optuna.Study, fmt: str) -> str:
    """Every trial in one of the report formats (md, csv, html, ...): number, state, objective values,
    parameters (``params_*``), start and end times (ISO 8601), duration in seconds and the trial's own
    attributes (``user_attrs_*``); Optuna's internal ``system_attrs`` are left out. A checkpoint that is not
    there (removed by the spec's ``keep_checkpoints``, or on another machine's disk) reads empty: the export
    points at no file that is gone. Trials record absolute paths (``job.make_job``)."""
    from ..report import export_table

    table = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete",
                                          "duration", "params", "user_attrs"))
    if "duration" in table:
        table.insert(table.columns.get_loc("duration"), "duration_seconds", table.pop("duration").dt.total_seconds())
    for column in ("datetime_start", "datetime_complete"):
        if column in table:
            table[column] = table[column].map(lambda value: None if pd.isna(value) else value.isoformat())
    if CHECKPOINT_COLUMN in table:
        table[CHECKPOINT_COLUMN] = table[CHECKPOINT_COLUMN].map(
            lambda path: path if isinstance(path, str) and Path(path).is_file() else None)
    return export_table(table, fmt, title=f"study {study.study_name}: trials")
