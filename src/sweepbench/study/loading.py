"""Creating a study, or loading it to resume, with the spec's pruner and, for a worker, its sampler."""

from __future__ import annotations

import optuna

from ..config import ConfigError
from . import identity
from .job import StudyJob, redact
from .samplers import create_sampler
from .seeds import worker_seed
from .spec import StudySpec
from .storage import RetryingStorage, _quiet, storage_lock


def create_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(**spec.pruner_options)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(max_resource=spec.base_config.epochs, **spec.pruner_options)
    return optuna.pruners.NopPruner()


def load_study(job: StudyJob, storage: RetryingStorage, worker_index: int | None = None) -> optuna.Study:
    """Creates the study, or loads it to resume; its directions and its spec's identity (``identity``) must be
    the spec's, else nothing is written. A worker (``worker_index`` given) gets the spec's sampler with its own
    seed; without one the study is only read and written to."""
    spec = job.spec
    with _quiet():
        study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions,
                                    load_if_exists=True, pruner=create_pruner(spec))
        stored = [direction.name.lower() for direction in study.directions]
        if stored != spec.directions:
            changed = None if job.new_spec_version else identity.refusal(study, spec, redact(job.storage_url))
            raise changed or ConfigError(
                f"objective: study {spec.name!r} in {redact(job.storage_url)} optimises {stored}, the spec "
                f"{spec.directions}; Optuna cannot change a study's directions (not even as a new spec version): "
                "rename the study or use another storage")
        with storage_lock(job.storage_url):
            identity.settle(study, spec, redact(job.storage_url), job.new_spec_version)
        if study.metric_names != spec.metric_names:
            study.set_metric_names(spec.metric_names)
    if worker_index is not None:
        study.sampler = create_sampler(spec, worker_seed(spec, study, job.storage_url, worker_index))
    return study

