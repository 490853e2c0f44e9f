"""The statistics of a sampler comparison, as the HPO benchmark suites compute them: best-so-far curves, the
interquartile mean with a bootstrap interval, the area under the curve, Wilcoxon signed-rank tests on paired
seeds with Holm's correction, and mean ranks. Every score is oriented so that higher is better (a minimised
objective is negated first), so the rest never asks for a direction. scipy does the tests and the bootstrap;
this module only arranges the inputs (and does Holm's step-down, which scipy does not have)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


def oriented(values: Sequence[float], direction: str) -> np.ndarray:
    """``values`` with higher meaning better: a minimised objective negated."""
    array = np.asarray(values, dtype=float)
    return -array if direction == "minimize" else array


def best_so_far(scores: Sequence[float]) -> np.ndarray:
    """The best score after each trial (NaN, a pruned or failed trial, never counts as a best)."""
    array = np.asarray(scores, dtype=float)
    return np.fmax.accumulate(np.where(np.isnan(array), -np.inf, array))


def area_under_curve(curve: Sequence[float]) -> float:
    """The mean of a best-so-far curve over its trials: high when a sampler gets good early and stays good."""
    finite = np.asarray(curve, dtype=float)
    return float(np.mean(finite)) if len(finite) and np.isfinite(finite).all() else math.nan


def first_reaching(curve: Sequence[float], target: float) -> int | None:
    """The index of the first point of ``curve`` at or above ``target``, or None when it never gets there."""
    hits = np.flatnonzero(np.asarray(curve, dtype=float) >= target)
    return int(hits[0]) if len(hits) else None


def iqm(values: Sequence[float]) -> float:
    """The interquartile mean: the mean of the middle half, robust to the odd lucky or broken seed."""
    return float(stats.trim_mean(np.asarray(values, dtype=float), 0.25))


def bootstrap_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap 95% interval of the IQM (NaN, NaN below two values; one point when all agree)."""
    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        return math.nan, math.nan
    if np.all(array == array[0]):
        return float(array[0]), float(array[0])
    result = stats.bootstrap((array,), lambda sample, axis: stats.trim_mean(sample, 0.25, axis=axis),
                             confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the order given."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


@dataclass(frozen=True)
class Verdict:
    """One pair of samplers on one measure, over the seeds both finished."""

    first: str
    second: str
    measure: str
    median_difference: float  # first minus second, oriented: > 0 means first is better
    p_value: float
    p_holm: float
    alpha: float = 1 - CONFIDENCE

    @property
    def outcome(self) -> str:
        if not self.p_holm < self.alpha or self.median_difference == 0:
            return "no difference"
        return f"{self.first} better" if self.median_difference > 0 else f"{self.second} better"

    def describe(self) -> str:
        return (f"{self.first} vs {self.second} on {self.measure}: {self.outcome} "
                f"(Wilcoxon p = {self.p_value:.3g}, Holm-adjusted {self.p_holm:.3g})")


def wilcoxon_p(first: Sequence[float], second: Sequence[float]) -> float:
    """The two-sided Wilcoxon signed-rank p-value of paired scores; 1 when every pair ties (no evidence)."""
    differences = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    if not np.any(differences):
        return 1.0
    return float(stats.wilcoxon(first, second, zero_method="wilcox", alternative="two-sided").pvalue)


def pairwise_verdicts(scores: Mapping[str, Sequence[float]], measure: str) -> list[Verdict]:
    """Every pair of samplers compared on paired seeds (``scores[sampler][i]`` is seed i's), Holm-corrected over
    the pairs of this measure."""
    names = list(scores)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    p_values = [wilcoxon_p(scores[a], scores[b]) for a, b in pairs]
    return [Verdict(a, b, measure, float(np.median(np.subtract(scores[a], scores[b]))), p, adjusted)
            for (a, b), p, adjusted in zip(pairs, p_values, holm(p_values))]


def mean_ranks(scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each sampler's rank per seed (1 = best, ties share the mean rank), averaged over the seeds: the Borda
    order, best first."""
    names = list(scores)
    table = np.array([scores[name] for name in names], dtype=float)  # samplers x seeds
    ranks = np.apply_along_axis(lambda column: stats.rankdata(-column), 0, table)
    means = dict(zip(names, ranks.mean(axis=1).tolist()))
    return dict(sorted(means.items(), key=lambda item: item[1]))
