"""What a study keeps of its trials' checkpoints (``budget.keep_checkpoints`` in the spec): a long study must not
fill its disk with two files per trial that nobody will open.

- ``best`` (the default): the best.pt of the study's best trial (a Pareto study: of each trial on the front);
  every other trial's folder is removed once it has ended, and no trial keeps its last.pt;
- ``all``: every trial's best.pt and last.pt;
- ``none``: nothing once a trial has ended.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .job import StudyJob

ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def trial_checkpoint_dir(job: StudyJob, trial_number: int) -> Path:
    return Path(job.checkpoint_root) / f"trial-{trial_number:04d}"


def keep_checkpoints(study: optuna.Study, job: StudyJob, trial_number: int) -> None:
    """Applies the spec's policy once trial ``trial_number`` has ended. Folders of trials still running, on any
    worker, are left alone."""
    policy = job.spec.keep_checkpoints
    if policy == "all":
        return
    folder = trial_checkpoint_dir(job, trial_number)
    if policy == "none":
        shutil.rmtree(folder, ignore_errors=True)
        return
    (folder / "last.pt").unlink(missing_ok=True)
    keep = {trial.number for trial in _best_trials(study)}
    for trial in study.get_trials(deepcopy=False, states=ENDED):
        if trial.number not in keep:
            shutil.rmtree(trial_checkpoint_dir(job, trial.number), ignore_errors=True)


def _best_trials(study: optuna.Study) -> list:
    from .summary import best_trial  # summary reads the workers' tallies, which run trials, which call this

    if len(study.directions) > 1:
        return study.best_trials
    best = best_trial(study)
    return [] if best is None else [best]
