"""The samplers a study spec may name, as a registry: adding one is one decorated function here. Each entry says
what the spec's validation needs to know (whether it handles two objectives, whether it has a startup phase), and
its factory makes the Optuna sampler for one worker's seed. An unknown name is refused, never run as another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..registry import Registry

if TYPE_CHECKING:
    from .spec import StudySpec

Factory = Callable[["StudySpec", "int | None", dict[str, int]], optuna.samplers.BaseSampler]


@dataclass(frozen=True)
class SamplerEntry:
    name: str
    make: Factory  # (spec, seed, startup options) -> sampler; startup: {"n_startup_trials": N} or {}
    multi_objective: bool
    startup_trials: bool


SAMPLERS: Registry[SamplerEntry] = Registry("sampler")


def register_sampler(multi_objective: bool, startup_trials: bool) -> Callable[[Factory], Factory]:
    return SAMPLERS.decorator(lambda make: SamplerEntry(make.__name__, make, multi_objective, startup_trials))


def sampler_names() -> tuple[str, ...]:
    """In the order they are registered (the spec's error messages list them so)."""
    return tuple(SAMPLERS.in_order())


def create_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    startup = {} if spec.sampler_startup_trials is None else {"n_startup_trials": spec.sampler_startup_trials}
    return SAMPLERS.get(spec.sampler).make(spec, seed, startup)


@register_sampler(multi_objective=True, startup_trials=True)
def tpe(spec: StudySpec, seed: int | None, startup: dict[str, int]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **startup)


@register_sampler(multi_objective=True, startup_trials=False)
def random(spec: StudySpec, seed: int | None, startup: dict[str, int]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


@register_sampler(multi_objective=False, startup_trials=True)
def cmaes(spec: StudySpec, seed: int | None, startup: dict[str, int]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=seed, **startup)


@register_sampler(multi_objective=True, startup_trials=True)
def gp(spec: StudySpec, seed: int | None, startup: dict[str, int]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, **startup)


@register_sampler(multi_objective=True, startup_trials=False)
def grid(spec: StudySpec, seed: int | None, startup: dict[str, int]) -> optuna.samplers.BaseSampler:
    return GridSampler({param.name: param.grid_values() for param in spec.search}, seed=seed)


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` once the grid is done: that call only works inside
    ``Study.optimize``, and the workers here stop at ``target_trials()`` (capped at the grid's size) anyway."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        return None
