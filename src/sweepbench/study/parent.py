"""The study's MLflow parent run: created once (its id kept in the study), reopened on every resume, and given the
study's outcome at the end: trial counts, the best trial and its checkpoint, the trials table, Optuna's plots.
Before and after the workers run, the trials' child runs are reconciled with Optuna's states (``reconcile``): a
child run left RUNNING by a dead worker or a tracking outage ends with its trial's outcome, and a finished
trial whose run could never be created gets one rebuilt from what Optuna holds."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import engine
from ..status import MlflowStatus, mlflow_status, status_of_trial
from ..tracking import Store, config_params, environment_tags
from ..tracking.store import DESCRIPTION_TAG, MAX_MESSAGE_LENGTH
from .coordination import Tally
from .identity import FINGERPRINT_TAG, VERSION_ATTR, VERSION_TAG, fingerprint
from .job import StudyJob, redact
from .spec import ParamSpec, StudySpec
from .storage import PARENT_RUN_ATTR, RUN_ID_ATTR, _quiet, storage_lock
from .registry import register_best_model
from .summary import best_trial, export_trials
from .trial import apply_params, trial_run_name, trial_tags

log = logging.getLogger(__name__)


def _open_parent_run(study: optuna.Study, job: StudyJob, store: Store) -> str:
    """The study's MLflow parent run: created once (its id kept in the study), reopened on every resume."""
    with storage_lock(job.storage_url):
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id and store.reopen(run_id):
            return run_id
        run_id = _create_parent_run(store, job)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id


def _create_parent_run(store: Store, job: StudyJob) -> str:
    spec = job.spec
    device = engine.resolve_device(spec.base_config.device)
    tags = {**environment_tags(device), "optuna.study_name": spec.name, "optuna.storage": redact(job.storage_url),
            "spec": spec.source, "description": spec.description}
    search = "; ".join(f"{param.name}: {_describe(param)}" for param in spec.search)
    params = {"model": spec.base_config.model, "dataset": spec.base_config.dataset,
              "objectives": ", ".join(f"{o.metric} ({o.direction})" for o in spec.objectives),
              "sampler": spec.sampler, "sampler_seed": spec.sampler_seed, "pruner": spec.pruner,
              "pruner_options": spec.pruner_options, "search_space": search[:MAX_MESSAGE_LENGTH]}
    if job.comparison:
        tags["sweepbench.comparison"] = job.comparison
    experiment_id = store.experiment(job.experiment, None if job.comparison else spec.description or None)
    return store.start_run(experiment_id, f"study-{spec.name}", "study", tags, params, job.comparison_run_id)


RECONCILED_TAG = "sweepbench.reconciled"
RECOVERED_TAG = "sweepbench.recovered"


def reconcile(study: optuna.Study, job: StudyJob, store: Store, parent_run_id: str) -> int:
    """Ends the study's child runs left RUNNING although their trial has ended (its worker died, or the tracking
    store was down when it ended), and rebuilds the runs of finished trials that have none; returns how many
    runs it touched. Runs of trials still RUNNING are their live workers' (or go stale and are handled then)."""
    trials = study.get_trials(deepcopy=False)
    by_number = {trial.number: trial for trial in trials}
    linked = {trial.user_attrs.get(RUN_ID_ATTR): trial for trial in trials}
    experiment_id = store.experiment(job.experiment)
    runs = store.child_runs([experiment_id], parent_run_id)
    numbers = {run.info.run_id: _trial_number(run) for run in runs}
    touched = 0
    for run in runs:
        trial = linked.get(run.info.run_id) or by_number.get(numbers[run.info.run_id])
        ended = status_of_trial(trial.state.name) if trial is not None else None
        if run.info.status != MlflowStatus.RUNNING or ended is None:
            continue
        duplicate = linked.get(run.info.run_id) is None and trial.user_attrs.get(RUN_ID_ATTR) is not None
        reason = ("a second run of this trial, created by a retried request" if duplicate else
                  f"left RUNNING (dead worker or tracking outage); its trial ended {trial.state.name}")
        store.end_run(run.info.run_id, MlflowStatus.KILLED if duplicate else mlflow_status(ended),
                      {RECONCILED_TAG: reason, "status": str(ended)})
        touched += 1
    with_runs = set(numbers.values())
    for trial in trials:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and trial.number not in with_runs:
            _recover_run(trial, job, store, experiment_id, parent_run_id)
            touched += 1
    if touched:
        log.warning(f"reconciled {touched} MLflow run(s) of study {job.spec.name} with Optuna's trial states")
    return touched


def _recover_run(trial: FrozenTrial, job: StudyJob, store: Store, experiment_id: str,
                 parent_run_id: str) -> None:
    """A child run for a finished trial that has none, from what Optuna holds: the parameters, the reported
    metric per epoch and the trial's results; tagged, since the other per-epoch metrics are missing."""
    config = apply_params(job.spec.base_config, trial.params)
    version, ended = trial.user_attrs.get(VERSION_ATTR), status_of_trial(trial.state.name)
    tags = {**trial_tags(job.spec, trial, version), "status": str(ended),
            RECOVERED_TAG: "rebuilt from the Optuna trial: the tracking store was unreachable while it ran"}
    run_id = store.start_run(experiment_id, trial_run_name(trial), "trial", tags, config_params(config),
                             parent_run_id)
    metric = job.spec.metric_names[0]
    for step, value in sorted(trial.intermediate_values.items()):
        store.log(run_id, metrics={metric: value}, step=step)
    results = {name: trial.user_attrs.get(name) for name in ("test_accuracy", "train_seconds")}
    if trial.values and metric == "val_accuracy":
        results["best_val_accuracy"] = trial.values[0]
    store.log(run_id, metrics=results, step=trial.user_attrs.get("epochs_run") or 0)
    store.end_run(run_id, mlflow_status(ended))


def _trial_number(run: Any) -> int | None:
    number = run.data.tags.get("optuna.trial_number", "")
    return int(number) if number.isdigit() else None


def _describe(param: ParamSpec) -> str:
    if param.type == "categorical":
        return f"one of {list(param.choices)}"
    extras = (" log" if param.log else "") + (f" step {param.step:g}" if param.step else "")
    return f"{param.type} [{param.low:g}, {param.high:g}]{extras}"


BEST_MODEL_TAG = "best_model_uri"


def log_study_outcome(study: optuna.Study, job: StudyJob, store: Store, parent_run_id: str) -> None:
    """Logs the study's outcome to its parent run: trial counts, the best trial (number, params, values,
    checkpoint, its model registered: ``registry``), a description naming them, the trials table as CSV,
    Optuna's plots as PNG. A comparison's member study registers no model and makes no plots: it measures its
    sampler, and its comparison's run has the curves (``compare``)."""
    trials = study.get_trials(deepcopy=False)
    counts = {f"n_{state.name.lower()}": sum(t.state == state for t in trials) for state in TrialState}
    metrics: dict[str, float] = dict(counts)
    tags = {"n_trials_target": str(job.spec.target_trials()), VERSION_TAG: str(job.spec_version),
            FINGERPRINT_TAG: fingerprint(job.spec)}
    best = best_trial(study)
    if best is not None:
        metrics.update({f"best_{name}": value for name, value in zip(job.spec.metric_names, best.values)})
        metrics["best_trial_number"] = best.number
        tags.update({"best_trial_number": str(best.number), "best_run_id": best.user_attrs.get(RUN_ID_ATTR, ""),
                     **{f"best.{name}": str(value) for name, value in best.params.items()}})
        _log_checkpoint(store, parent_run_id, best, tags)
    if len(study.directions) > 1:
        tags["pareto_trial_numbers"] = ",".join(str(trial.number) for trial in study.best_trials)
    model_uri = None if job.comparison else register_best_model(study, job, store)
    if model_uri:
        tags[BEST_MODEL_TAG] = model_uri
    tags[DESCRIPTION_TAG] = describe_outcome(job, trials, best, model_uri)
    store.log(parent_run_id, metrics=metrics, tags=tags, step=Tally.of(trials).finished)
    store.log_text(parent_run_id, export_trials(study, "csv"), "trials.csv")
    if Path(job.spec.source).is_file():
        store.log_artifact(parent_run_id, job.spec.source, "spec" if job.spec_version == 1 else
                           f"spec/v{job.spec_version}")
    if not job.comparison:
        _log_plots(store, parent_run_id, study, job.spec)


def describe_outcome(job: StudyJob, trials: list[FrozenTrial], best: FrozenTrial | None,
                     model_uri: str | None) -> str:
    """The parent run's description (MLflow shows it on the run's page): the best trial and where its model is."""
    tally = Tally.of(trials)
    counts = (f"{tally.finished} of {job.spec.target_trials()} trials finished "
              f"({sum(t.state == TrialState.COMPLETE for t in trials)} complete, "
              f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned)")
    if best is None:
        return f"Study {job.spec.name}: {counts}; no best trial yet."
    values = ", ".join(f"{name} {value:.4f}" for name, value in zip(job.spec.metric_names, best.values))
    model = f" Its model: `{model_uri}`." if model_uri else ""
    return f"Study {job.spec.name}: {counts}. Best: {trial_run_name(best)}, {values}.{model}"


def _log_checkpoint(store: Store, parent_run_id: str, best: FrozenTrial, tags: dict[str, str]) -> None:
    """Links the best trial's checkpoint: its path as a tag, and the file itself when it is on this machine."""
    path = best.user_attrs.get("checkpoint")
    if path:
        tags["best_checkpoint"] = path
        if Path(path).is_file():
            store.log_artifact(parent_run_id, path, "best_checkpoint")


def _study_plots(study: optuna.Study, spec: StudySpec) -> dict[str, Callable[[], Any]]:
    from optuna.visualization import matplotlib as plots

    target = {}
    if len(spec.objectives) > 1:
        target = {"target": lambda trial: trial.values[0], "target_name": spec.metric_names[0]}
    figures = {
        "optimization_history": lambda: plots.plot_optimization_history(study, **target),
        "param_importances": lambda: plots.plot_param_importances(study, **target),
        "parallel_coordinate": lambda: plots.plot_parallel_coordinate(study, **target),
        "intermediate_values": lambda: plots.plot_intermediate_values(study),
    }
    if len(spec.objectives) > 1:
        figures["pareto_front"] = lambda: plots.plot_pareto_front(study, target_names=spec.metric_names)
    return figures


def _log_plots(store: Store, run_id: str, study: optuna.Study, spec: StudySpec) -> None:
    """Optuna's matplotlib plots (no plotly or kaleido needed); a plot the data cannot make yet (importances
    from one trial, say) is skipped with a warning."""
    import matplotlib

    matplotlib.use("Agg")

    for name, plot in _study_plots(study, spec).items():
        try:
            with _quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # matplotlib on a flat axis: cosmetic
                axes = plot()
        except (ValueError, RuntimeError) as exc:
            log.warning(f"plot {name} skipped: {exc}")
            continue
        axes.figure.tight_layout()
        store.log_figure(run_id, axes.figure, f"plots/{name}.png")
