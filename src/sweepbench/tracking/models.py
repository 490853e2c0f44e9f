"""Trained models in MLflow: logged to their run once (a ``torch.export`` program with a signature and an input
example), and registered in MLflow's Model Registry under a name, with an alias that points at the best version.
A study registers its best trial's model under the study's name (``study.registry``); ``train --register NAME``
registers one run's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from .store import TRACKING_URI_ENV, Store

MODEL_NAME = "model"
INPUT_EXAMPLE_SIZE = 4
BEST_ALIAS = "best"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # a logged model's registered versions, as mlflow.register_model sets
RUN_TAG = "sweepbench.registered_as"  # on the run whose model was registered: the models:/ URI of its version
ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def log_model(store: Store, run_id: str, model: torch.nn.Module, example: np.ndarray, step: int) -> str:
    """Logs ``model`` (a copy, on CPU, in eval mode) to ``run_id`` as a ``torch.export`` program (loading it runs
    no pickled code), with a signature and ``example`` (already normalised inputs) as input example, linked to
    the run's metrics at ``step``; returns the logged model's id. Requirements are given, not inferred: inferring
    them loads the model again in a subprocess (seconds). MLflow's serving-input check (load the model back,
    predict the example) is skipped: a third of the logging time; tests load logged models and predict."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model = copy.deepcopy(model).cpu().eval()
    with torch.inference_mode():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    client = store.client
    logged = client.create_logged_model(store.experiment_id_of(run_id), name=MODEL_NAME, source_run_id=run_id)
    with fluent_tracking_uri(store.tracking_uri), no_requirement_check():
        mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=signature, input_example=example,
                                 serialization_format="pt2", model_id=logged.model_id, run_id=run_id, step=step,
                                 validate_serving_input=False,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


@contextlib.contextmanager
def no_requirement_check() -> Iterator[None]:
    """Skips MLflow's check that the declared requirements are installed: they are this process's own torch, so
    they are by construction, and the check maps every installed package to its modules (0.5 s to 1.4 s the first
    time in a process). Left alone if a later MLflow moves the function."""
    import mlflow.utils.environment as environment

    original = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if original is None:
        yield
        return
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = original


def logged_model_id(store: Store, run_id: str) -> str | None:
    """The id of the model logged to ``run_id`` (the latest, if it has several), or None."""
    run = store.client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    return max(outputs, key=lambda output: output.step).model_id if outputs else None


def register(store: Store, name: str, run_id: str, model_id: str, alias: str | None = BEST_ALIAS) -> str:
    """A new version of registered model ``name`` from logged model ``model_id`` of ``run_id``, ``alias`` moved
    to it; returns its ``models:/`` URI (by alias when there is one), also tagged on the run."""
    client = store.client
    try:
        client.create_registered_model(name, description="registered by sweepbench")
    except MlflowException as exc:
        if exc.error_code not in ALREADY_EXISTS:
            raise
    source = client.get_logged_model(model_id).artifact_location  # a models:/ source resolves via the global URI
    version = client.create_model_version(name, source, run_id=run_id, model_id=model_id)
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps([{"name": name,
                                                                             "version": version.version}])})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}"
    client.set_tag(run_id, RUN_TAG, f"models:/{name}/{version.version}")
    return uri


@dataclass(frozen=True)
class Registration:
    """What ``register_if_better`` did: the new version's URI, whether ``best`` moved to it, and, when it stayed
    because the two runs' validation scores do not compare, why."""

    uri: str
    best_moved: bool
    not_comparable: str | None = None


def register_if_better(store: Store, name: str, run_id: str, model_id: str,
                       metric: str = "val_accuracy") -> Registration:
    """A new version of ``name`` from ``run_id``'s model; ``best`` moves to it when nothing has it yet, or when
    its run's final ``metric`` (the registered weights' own; higher is better) beats that of the run ``best``
    points at. Choosing a model is selection, so it is made on validation: the test set only reports. Scores on
    different validation images (another dataset or ``val_size``) do not compare: ``best`` then stays."""
    current = version_by_alias(store, name)
    ours = store.client.get_run(run_id)
    theirs = store.client.get_run(current.run_id) if current and current.run_id else None
    uri = register(store, name, run_id, model_id, alias=None)
    if current is None or theirs is None:
        return _move_best(store, name, uri)
    not_comparable = _other_validation_split(ours, theirs)
    if not_comparable:
        return Registration(uri, False, f"version {current.version} was validated on {not_comparable}")
    score, best_score = ours.data.metrics.get(metric), theirs.data.metrics.get(metric)
    if score is not None and (best_score is None or score > best_score):
        return _move_best(store, name, uri)
    return Registration(uri, False)


def _move_best(store: Store, name: str, uri: str) -> Registration:
    store.client.set_registered_model_alias(name, BEST_ALIAS, uri.rsplit("/", 1)[-1])
    return Registration(uri, True)


def _other_validation_split(ours: Run, theirs: Run) -> str | None:
    """How ``theirs`` was validated on other images than ``ours``, or None when both saw the same ones. The split is
    fixed by the data and ``val_size``; the dataset's fingerprint covers its every split."""
    sizes = [run.data.params.get("val_size") for run in (ours, theirs)]
    if sizes[0] != sizes[1]:
        return f"another split (val_size {sizes[1]}, this run's {sizes[0]})"
    fingerprints = [run.data.tags.get("dataset_fingerprint") for run in (ours, theirs)]
    if fingerprints[0] != fingerprints[1]:
        return f"other data (dataset {theirs.data.params.get('dataset')}, fingerprint {fingerprints[1]})"
    return None


def version_by_alias(store: Store, name: str, alias: str = BEST_ALIAS) -> ModelVersion | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist."""
    try:
        return store.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Points MLflow's global tracking URI at ``uri`` for a call that knows no other (``log_model``), then puts
    back both the global and ``MLFLOW_TRACKING_URI``, which setting the global also overwrites: child processes
    started later must not inherit this store."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    previous_env = os.environ.get(TRACKING_URI_ENV)
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if previous_env is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = previous_env
