"""A worker that joins a running study from another machine (``sweepbench study worker``): no parent run of its
own, no outcome to log; it reserves and runs trials on the shared storage until the study is settled. The study's
``study run`` (the head) made the study and its parent run, and ends them once every trial has finished."""

from __future__ import annotations

import dataclasses
import logging
import time

import optuna

from . import identity
from .coordination import Tally
from .job import StudyJob, redact
from .loading import load_study
from .processes import _run_workers
from .storage import PARENT_RUN_ATTR, _quiet, adopt_heartbeat_interval, open_storage, reader, stored_study_names

log = logging.getLogger(__name__)

STUDY_POLL_SECONDS = 2.0


class StudyNotStarted(RuntimeError):
    """The study (or its parent run) did not appear in the storage within the worker's wait."""


def wait_for_study(job: StudyJob, wait_seconds: float) -> None:
    """Returns once the storage holds the study with its parent run, as its ``study run`` leaves it: a worker
    started by a scheduler may come up before the head."""
    deadline = time.monotonic() + wait_seconds
    announced = False
    while True:
        if job.spec.name in stored_study_names(job.storage_url):
            with _quiet():
                study = optuna.load_study(study_name=job.spec.name, storage=reader(job.storage_url))
            if PARENT_RUN_ATTR in study.user_attrs:
                return
        if time.monotonic() >= deadline:
            raise StudyNotStarted(
                f"study {job.spec.name!r} was not started in {redact(job.storage_url)} within {wait_seconds:.0f} s; "
                "start it with `sweepbench study run SPEC --storage` on this storage (the head, which also runs "
                "trials), or give the worker a longer --wait")
        if not announced:
            log.info(f"waiting up to {wait_seconds:.0f} s for study {job.spec.name!r} to be started in "
                     f"{redact(job.storage_url)}")
            announced = True
        time.sleep(STUDY_POLL_SECONDS)


def join_study(job: StudyJob, wait_seconds: float) -> Tally:
    """Runs ``job.workers`` local workers on a started study until it is settled (or the spec's timeout passes);
    the spec must be the study's (its identity is checked as ``study run`` checks it). Returns the tally."""
    from . import check_inputs, useful_workers

    check_inputs(job)
    wait_for_study(job, wait_seconds)
    study = load_study(job, open_storage(job))
    job = adopt_heartbeat_interval(job, study)
    tally = Tally.of(study.get_trials(deepcopy=False))
    job = dataclasses.replace(job, spec_version=identity.version_of(study, job.spec),
                              workers=useful_workers(job, tally))
    log.info(f"joined study {job.spec.name!r}: {tally.finished} of {job.spec.target_trials()} trials finished, "
             f"{tally.running} running; {job.workers} worker(s) here")
    _run_workers(job)
    return Tally.of(study.get_trials(deepcopy=False))
