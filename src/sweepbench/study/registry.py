"""The study's best model, registered: at the end of a study (and of every resumed run of it) the best trial's
trained model is logged once to that trial's MLflow run, with its signature and an input example, and registered
in MLflow's Model Registry under the study's name, the alias ``best`` moved to it. ``study show`` prints its
``models:/<study>@best`` URI; ``mlflow.pytorch.load_model`` of it predicts as the trial's run was tested.

Trials log no model while they run (a model per trial would cost more than the small trials it belongs to). A
completed trial keeps its final weights (``final.pt``, the weights its test accuracy was measured with) in its
checkpoint folder, under ``keep_checkpoints = "best"`` only while it is the study's best (the policy removes the
others' folders) and under ``"all"`` always; the study's end builds the model from them. A study with several objectives has a front, not a best: nothing is registered.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial

from .. import engine
from ..data import load_dataset
from ..models import create_model
from ..tracking import Store, sqlite_path
from ..tracking.models import BEST_ALIAS, INPUT_EXAMPLE_SIZE, log_model, logged_model_id, register, version_by_alias
from .checkpoints import trial_checkpoint_dir
from .job import StudyJob
from .storage import RUN_ID_ATTR

log = logging.getLogger(__name__)

FINAL_WEIGHTS = "final.pt"


def best_model_uri(name: str) -> str:
    return f"models:/{name}@{BEST_ALIAS}"


def describe_registered_model(store: Store, name: str) -> str:
    """``study show``'s line on the study's registered model (an embedded store that does not exist is not
    created to say so)."""
    database = sqlite_path(store.tracking_uri)
    if database is not None and not database.is_file():
        return f"best model: no MLflow store at {database} (give --tracking-uri for the study's store)"
    version = version_by_alias(store, name)
    if version is None:
        return f"best model: none registered as {best_model_uri(name)} in {store.tracking_uri}"
    return (f"best model: {best_model_uri(name)} (version {version.version}, run {version.run_id}); load it with "
            f"mlflow.pytorch.load_model")


def keep_final_weights(study: optuna.Study, job: StudyJob, trial_number: int, result: engine.RunResult) -> None:
    """Saves a completed trial's final weights when it is now the study's best (single objective), or always
    where the spec keeps every checkpoint."""
    from .summary import best_trial  # summary reads the workers' tallies, which run trials, which call this

    policy = job.spec.keep_checkpoints
    if len(study.directions) > 1 or policy == "none" or result.model is None:
        return
    best = best_trial(study)
    if policy == "all" or (best is not None and best.number == trial_number):
        folder = trial_checkpoint_dir(job, trial_number)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(result.model.state_dict(), folder / FINAL_WEIGHTS)


def register_best_model(study: optuna.Study, job: StudyJob, store: Store) -> str | None:
    """Registers the best trial's model unless ``best`` already points at it; returns its URI, or None with a
    warning when there is no best trial or its weights are not kept."""
    from .summary import best_trial

    best = best_trial(study)
    run_id = best.user_attrs.get(RUN_ID_ATTR) if best is not None else None
    if len(study.directions) > 1 or run_id is None:
        return None
    name = job.spec.name
    current = version_by_alias(store, name)
    if current is not None and current.run_id == run_id:
        return best_model_uri(name)
    weights = trial_checkpoint_dir(job, best.number) / FINAL_WEIGHTS
    if not weights.is_file():
        log.warning(f"study {name}: the best trial's ({best.number}) final weights are not kept here "
                    f"({weights}; keep_checkpoints = {job.spec.keep_checkpoints!r}); no model registered")
        return None
    model_id = logged_model_id(store, run_id) or _log_trial_model(store, run_id, best, job, weights)
    uri = register(store, name, run_id, model_id)
    log.info(f"study {name}: trial {best.number}'s model registered as {uri}")
    return uri


def _log_trial_model(store: Store, run_id: str, trial: FrozenTrial, job: StudyJob, weights: Path) -> str:
    from .trial import apply_params  # trial.py calls keep_final_weights

    config = apply_params(job.spec.base_config, trial.params)
    model = create_model(config.model, **config.model_kwargs)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    dataset = load_dataset(config.dataset, config.data_dir, False, config.val_size, **config.dataset_kwargs)
    example = engine.normalise(dataset.x_val[:INPUT_EXAMPLE_SIZE], dataset.mean, dataset.std).numpy()
    return log_model(store, run_id, model, example, trial.user_attrs.get("epochs_run") or config.epochs)
