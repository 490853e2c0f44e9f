"""A comparison's settings: a study spec with a ``[compare]`` table (``samplers``, ``seeds``, ``target``), or any
study spec with the samplers and seeds given as flags. Each sampler x seed pair is one member study: the study
spec with that sampler, the seed as the sampler's seed and as the training seed of every trial (pairing: seed s
gives every sampler the same training runs and, where the sampler starts at random, the same first trials)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import tomlcheck
from ..config import ConfigError
from ..study.samplers import SAMPLERS
from ..study.spec import MAX_SEED, StudySpec, parse_spec

COMPARE_KEYS = ("samplers", "seeds", "target")
DEFAULT_SAMPLERS = ("tpe", "random", "cmaes", "gp")
DEFAULT_SEEDS = 10
MIN_SEEDS = 2  # a paired test needs pairs; Wilcoxon says little below 6 (the report says so)
COMPARABLE = DEFAULT_SAMPLERS  # the grid sampler has no seed to vary: it is not compared


@dataclass(frozen=True)
class Comparison:
    """One study spec run under every sampler and seed; ``target`` is the objective value the report counts
    trials and seconds to (None: the report takes the median final best of all member studies)."""

    study: StudySpec
    samplers: tuple[str, ...]
    seeds: tuple[int, ...]
    target: float | None = None

    @property
    def name(self) -> str:
        return self.study.name

    @property
    def direction(self) -> str:
        return self.study.directions[0]

    def member_name(self, sampler: str, seed: int) -> str:
        return f"{self.name}.{sampler}.seed{seed}"

    def members(self) -> list[tuple[str, int]]:
        """Sampler x seed pairs, seed by seed: a comparison cut short has whole pairs for its first seeds."""
        return [(sampler, seed) for seed in self.seeds for sampler in self.samplers]

    def member_spec(self, sampler: str, seed: int) -> StudySpec:
        startup = self.study.sampler_startup_trials if SAMPLERS.get(sampler).startup_trials else None
        return dataclasses.replace(self.study, name=self.member_name(sampler, seed), sampler=sampler,
                                   sampler_seed=seed, sampler_startup_trials=startup,
                                   base_config=self.study.base_config.replace(seed=seed))

    def describe(self) -> str:
        return (f"comparison {self.name}: samplers {', '.join(self.samplers)} x {len(self.seeds)} seeds "
                f"({self.seeds[0]}..{self.seeds[-1]}), {self.study.target_trials()} finished trials each")


def load_comparison(path: str | Path, samplers: list[str] | None = None, seeds: int | None = None,
                    target: float | None = None) -> Comparison:
    """The study spec at ``path`` as a comparison: its ``[compare]`` table, the flags over it."""
    data, _ = tomlcheck.read_toml(path, "study spec")
    study = parse_spec(data, str(path))
    table = data.get("compare", {})
    try:
        return parse_comparison(study, tomlcheck.table("compare", table), samplers, seeds, target)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse_comparison(study: StudySpec, table: dict[str, Any], samplers: list[str] | None = None,
                     seeds: int | None = None, target: float | None = None) -> Comparison:
    tomlcheck.check_keys("compare", table, COMPARE_KEYS)
    chosen = _samplers("--samplers" if samplers else "compare.samplers",
                       samplers if samplers else table.get("samplers", list(DEFAULT_SAMPLERS)), study)
    count = tomlcheck.positive_int("--seeds" if seeds else "compare.seeds",
                                   seeds if seeds else table.get("seeds", DEFAULT_SEEDS), minimum=MIN_SEEDS)
    first = study.sampler_seed or 0
    if first + count - 1 > MAX_SEED:
        raise ConfigError(f"compare.seeds: {count} seeds from sampler.seed {first} pass {MAX_SEED}")
    if target is None and "target" in table:
        target = tomlcheck.number("compare.target", table["target"])
    return Comparison(study, chosen, tuple(range(first, first + count)), target)


def _samplers(label: str, names: Any, study: StudySpec) -> tuple[str, ...]:
    if not isinstance(names, list) or len(names) < 2:
        raise ConfigError(f"{label}: expected at least two samplers to compare, from: {', '.join(COMPARABLE)}")
    chosen = tuple(tomlcheck.choice(label, name, COMPARABLE) for name in names)
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"{label}: {', '.join(chosen)} names a sampler twice")
    if len(study.objectives) > 1:
        raise ConfigError("objective: a comparison ranks samplers on one objective; give one [objective] table")
    return chosen
