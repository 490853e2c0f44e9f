"""The sampler comparison's statistics (issue 19) against scipy and against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sweepbench.compare.stats import (area_under_curve, best_so_far, bootstrap_interval, first_reaching, holm, iqm,
                                      mean_ranks, oriented, pairwise_verdicts, wilcoxon_p)


def test_best_so_far_ignores_pruned_trials_and_a_minimised_objective_is_negated() -> None:
    assert best_so_far([0.2, math.nan, 0.5, 0.4, 0.9]).tolist() == [0.2, 0.2, 0.5, 0.5, 0.9]
    assert best_so_far(oriented([3.0, 1.0, 2.0], "minimize")).tolist() == [-3.0, -1.0, -1.0]
    assert area_under_curve([0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.525)
    assert math.isnan(area_under_curve(best_so_far([math.nan, 0.3])))  # no best before the second trial
    assert first_reaching([0.2, 0.5, 0.9], 0.5) == 1 and first_reaching([0.2, 0.5], 0.95) is None


def test_iqm_is_the_mean_of_the_middle_half_and_its_interval_holds_it() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0]
    assert iqm(values) == pytest.approx(np.mean([3.0, 4.0, 5.0, 6.0]))
    assert iqm(values) == pytest.approx(stats.trim_mean(values, 0.25))
    low, high = bootstrap_interval(values)
    assert low <= iqm(values) <= high and low >= 1.0 and high <= 100.0
    assert bootstrap_interval(values) == (low, high), "seeded: the same table on every rerun"
    assert bootstrap_interval([0.97] * 5) == (0.97, 0.97)
    assert all(math.isnan(bound) for bound in bootstrap_interval([0.97]))


def test_holm_matches_the_step_down_worked_by_hand() -> None:
    # sorted 0.01, 0.02, 0.04 times 3, 2, 1: 0.03, 0.04, 0.04 (kept monotone), back in the order given
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_wilcoxon_verdicts_on_paired_seeds_match_scipy_and_name_the_better_sampler() -> None:
    rng = np.random.default_rng(7)
    seed_effect = rng.normal(0.95, 0.01, size=10)  # what a seed's data order does to every sampler alike
    scores = {"tpe": seed_effect + 0.01 + rng.normal(0, 0.001, 10), "random": seed_effect,
              "gp": seed_effect + rng.normal(0, 0.001, 10)}
    verdicts = {(v.first, v.second): v for v in pairwise_verdicts(scores, "final best")}
    raw = {pair: stats.wilcoxon(scores[pair[0]], scores[pair[1]]).pvalue for pair in verdicts}
    for pair, verdict in verdicts.items():
        assert verdict.p_value == pytest.approx(raw[pair])
    assert [v.p_holm for v in verdicts.values()] == pytest.approx(holm(list(raw.values())))
    assert verdicts[("tpe", "random")].outcome == "tpe better"
    assert verdicts[("random", "gp")].outcome in ("no difference", "gp better")
    assert verdicts[("tpe", "random")].describe().startswith("tpe vs random on final best: tpe better (Wilcoxon p")
    assert wilcoxon_p([0.9, 0.8], [0.9, 0.8]) == 1.0, "all ties: no evidence either way"


def test_mean_ranks_share_ties_and_order_best_first() -> None:
    scores = {"a": [0.9, 0.8, 0.7], "b": [0.9, 0.9, 0.9], "c": [0.1, 0.1, 0.1]}
    # a and b tie on seed 0
    assert mean_ranks(scores) == {"b": pytest.approx(3.5 / 3), "a": pytest.approx(5.5 / 3), "c": 3.0}
    assert list(mean_ranks(scores)) == ["b", "a", "c"]
