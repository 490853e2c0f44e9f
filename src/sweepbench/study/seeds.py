"""The sampler seed of each worker of a study: reproducible for the first, different for every other."""

from __future__ import annotations

import os
import platform
import zlib

import numpy as np
import optuna

from .spec import StudySpec
from .storage import SEED_CLAIM_ATTR, storage_lock


def worker_seed(spec: StudySpec, study: optuna.Study, storage_url: str, worker_index: int,
                claimant: str | None = None) -> int | None:
    """The sampler seed of one worker: the spec's seed mixed with the study's trial count and the worker's index,
    so parallel workers and resumed runs do not replay one random start, and the spec's seed itself for the first
    worker of a new study (reproducible). The first process (``claimant``: host and pid) to take a (trial count,
    worker index) pair claims it in the study, under the storage lock; a worker on another machine that starts
    at the same pair also mixes in its own name instead of replaying the claimant's trials."""
    if spec.sampler_seed is None:
        return None
    trials_so_far = len(study.get_trials(deepcopy=False))
    claimant = claimant or f"{platform.node()}:{os.getpid()}"
    key = f"{SEED_CLAIM_ATTR}.{trials_so_far}.{worker_index}"
    with storage_lock(storage_url):
        owner = study.user_attrs.get(key)
        if owner is None:
            study.set_user_attr(key, claimant)
            owner = claimant
    if owner != claimant:
        return _mixed_seed(spec.sampler_seed, trials_so_far, worker_index, zlib.crc32(claimant.encode()))
    if trials_so_far == 0 and worker_index == 0:
        return spec.sampler_seed
    return _mixed_seed(spec.sampler_seed, trials_so_far, worker_index)


def _mixed_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
