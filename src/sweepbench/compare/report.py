"""A comparison's report, from its member studies' results: a table per sampler (final best as IQM with its
bootstrap 95% interval, area under the best-so-far curve, trials and training seconds to reach the target, wall
time, mean rank), Wilcoxon verdicts per pair (final best, then AUC) with Holm's correction, one plain-language
conclusion, and the anytime curves. Figures are in the objective's own units; the statistics run on scores
oriented so that higher is better."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import ConfigError
from .results import MemberResult
from .spec import Comparison
from .stats import (Verdict, area_under_curve, bootstrap_interval, first_reaching, iqm, mean_ranks,
                    pairwise_verdicts)

WILCOXON_MIN_PAIRS = 6  # below 6 pairs, no two-sided signed-rank p-value reaches 0.05
CURVE_POINTS = 40


@dataclass(frozen=True)
class ComparisonReport:
    comparison: Comparison
    table: pd.DataFrame
    verdicts: list[Verdict]
    target: float  # in the objective's units
    paired_seeds: tuple[int, ...]
    conclusion: str

    def notes(self) -> list[str]:
        study = self.comparison.study
        return [
            f"{study.metric_names[0]} ({self.comparison.direction}), {study.target_trials()} finished trials per "
            f"study, seeds {', '.join(map(str, self.paired_seeds))} paired across samplers",
            f"target {self.target:.4g} ({'given' if self.comparison.target is not None else 'the median final best'}"
            f"): trials and training seconds until a study first reaches it, median over the seeds that do",
            *(verdict.describe() for verdict in self.verdicts),
            self.conclusion,
        ]


def unoriented(value: float, direction: str) -> float:
    return -value if direction == "minimize" else value


def paired_seeds(comparison: Comparison, results: list[MemberResult]) -> tuple[int, ...]:
    """The seeds with a finished study for every sampler (a pair needs both sides)."""
    samplers_by_seed: dict[int, set[str]] = {}
    for result in results:
        samplers_by_seed.setdefault(result.seed, set()).add(result.sampler)
    return tuple(seed for seed in comparison.seeds if samplers_by_seed.get(seed) == set(comparison.samplers))


def build_report(comparison: Comparison, results: list[MemberResult]) -> ComparisonReport:
    """The report over the paired seeds; other results are left out. Refused while no seed is paired."""
    paired = paired_seeds(comparison, results)
    if not paired:
        raise ConfigError(f"comparison {comparison.name}: no seed has a finished study for every sampler yet "
                          f"({len(results)} of {len(comparison.members())} studies finished)")
    by_seed = {(result.seed, result.sampler): result for result in results}
    members = {sampler: [by_seed[seed, sampler] for seed in paired] for sampler in comparison.samplers}
    finals = {sampler: [member.final_best for member in group] for sampler, group in members.items()}
    areas = {sampler: [area_under_curve(member.curve) for member in group] for sampler, group in members.items()}
    direction = comparison.direction
    target = comparison.target if comparison.target is not None else unoriented(
        float(np.median([value for group in finals.values() for value in group])), direction)
    ranks = mean_ranks(finals)
    verdicts = pairwise_verdicts(finals, "final best") + pairwise_verdicts(areas, "AUC")
    rows = [_row(sampler, members[sampler], ranks[sampler], target, direction) for sampler in ranks]
    return ComparisonReport(comparison, pd.DataFrame(rows), verdicts, target, paired,
                            conclusion(list(ranks), verdicts, len(paired), comparison.study.target_trials()))


def _row(sampler: str, group: list[MemberResult], rank: float, target: float, direction: str) -> dict:
    finals = [member.final_best for member in group]
    low, high = sorted(unoriented(bound, direction) for bound in bootstrap_interval(finals))
    oriented_target = unoriented(target, direction)
    reached = [first_reaching(member.curve, oriented_target) for member in group]
    trials = [index + 1 for index in reached if index is not None]
    seconds = [float(np.cumsum(member.seconds)[index]) for member, index in zip(group, reached) if index is not None]
    return {
        "sampler": sampler, "seeds": len(group), "mean_rank": rank,
        "final_best_iqm": unoriented(iqm(finals), direction), "final_best_ci_low": low, "final_best_ci_high": high,
        "auc_iqm": unoriented(iqm([area_under_curve(member.curve) for member in group]), direction),
        "reached_target": f"{len(trials)}/{len(group)}",
        "trials_to_target": float(np.median(trials)) if trials else math.nan,
        "train_seconds_to_target": float(np.median(seconds)) if seconds else math.nan,
        "wall_seconds": float(np.median([member.wall_seconds for member in group])),
    }


def conclusion(order: list[str], verdicts: list[Verdict], pairs: int, n_trials: int) -> str:
    """Which sampler wins at this budget on the final best, or that the differences are within seed noise."""
    budget = f"at {n_trials} trials over {pairs} paired seeds"
    if pairs < WILCOXON_MIN_PAIRS:
        return (f"{budget}, no difference can be told from seed noise: a two-sided Wilcoxon test needs at least "
                f"{WILCOXON_MIN_PAIRS} pairs to reach p < 0.05; mean-rank order {', '.join(order)}")
    finals = [verdict for verdict in verdicts if verdict.measure == "final best"]
    leader = order[0]
    beaten = [_other(verdict, leader) for verdict in finals if verdict.outcome == f"{leader} better"]
    rest = [name for name in order[1:] if name not in beaten]
    if not beaten:
        others = [_beats(verdict) for verdict in finals if verdict.outcome != "no difference"]
        if not others:
            return (f"{budget}, the differences are within seed noise: no sampler's final best beats another's "
                    f"(Wilcoxon, Holm, 5%); mean-rank order {', '.join(order)}")
        return (f"no sampler wins {budget}: {leader} ranks first but is within seed noise of the others; beyond "
                f"it (Holm, 5%): {'; '.join(others)}")
    others = [_beats(verdict) for verdict in finals if verdict.outcome != "no difference"
              and leader not in (verdict.first, verdict.second)]
    also = f"; also beyond it: {'; '.join(others)}" if others else ""
    if not rest:
        return f"{leader} wins {budget}: its final best beats {', '.join(beaten)} beyond seed noise (Holm, 5%){also}"
    return (f"{leader} ranks first {budget}: it beats {', '.join(beaten)} beyond seed noise (Holm, 5%); against "
            f"{', '.join(rest)} the difference is within seed noise{also}")


def _other(verdict: Verdict, name: str) -> str:
    return verdict.second if verdict.first == name else verdict.first


def _beats(verdict: Verdict) -> str:
    winner = verdict.outcome.removesuffix(" better")
    return f"{winner} beats {_other(verdict, winner)}"


def curves_figure(comparison: Comparison, results: list[MemberResult], paired: tuple[int, ...]):
    """Best-so-far against trial number and against cumulative training seconds, per sampler: the IQM across
    the paired seeds with its bootstrap 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    direction, metric = comparison.direction, comparison.study.metric_names[0]
    figure, (by_trial, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    chosen = [result for result in results if result.seed in paired]
    horizon = float(np.median([np.nansum(result.seconds) for result in chosen]))
    grid = np.linspace(0, horizon, CURVE_POINTS)
    for sampler in comparison.samplers:
        group = [result for result in chosen if result.sampler == sampler]
        curves = np.array([result.curve for result in group])
        _band(by_trial, np.arange(1, curves.shape[1] + 1), curves, sampler, direction)
        timed = np.array([_on_grid(result, grid) for result in group])
        _band(by_time, grid, timed, sampler, direction)
    for axes, label in ((by_trial, "finished trials"), (by_time, "cumulative training seconds")):
        axes.set_xlabel(label)
        axes.set_ylabel(f"best {metric} so far")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{comparison.name}: IQM over {len(paired)} seeds, bootstrap 95% band")
    figure.tight_layout()
    return figure


def _on_grid(result: MemberResult, grid: np.ndarray) -> np.ndarray:
    """The best-so-far curve as a step function of cumulative training seconds, read at ``grid``."""
    ends = np.cumsum(np.nan_to_num(result.seconds))
    index = np.searchsorted(ends, grid, side="right") - 1
    values = np.where(index >= 0, result.curve[np.clip(index, 0, None)], -np.inf)
    return np.where(np.isfinite(values), values, np.nan)


def _band(axes, x: np.ndarray, curves: np.ndarray, label: str, direction: str) -> None:
    """IQM and bootstrap band per point, over the points where every seed has a best."""
    points = [_point(column, direction) for column in curves.T]
    centre, low, high = (np.array(values) for values in zip(*points))
    line, = axes.plot(x, centre, label=label)
    axes.fill_between(x, low, high, color=line.get_color(), alpha=0.2)


def _point(column: np.ndarray, direction: str) -> tuple[float, float, float]:
    if not np.isfinite(column).all():
        return math.nan, math.nan, math.nan
    low, high = sorted(unoriented(bound, direction) for bound in bootstrap_interval(column))
    return unoriented(iqm(column), direction), low, high
