"""A comparison's report on known results (no training): orientation of a minimised objective, the target
counts, a fused pack's shared seconds, and the conclusion in each of its cases."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from sweepbench.compare.report import build_report
from sweepbench.compare.results import MemberResult, member_result
from sweepbench.compare.spec import parse_comparison
from sweepbench.compare.stats import oriented
from sweepbench.study.spec import parse_spec

SEARCH = {"lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True}}


def comparison(metric: str = "val_accuracy", samplers: tuple = ("tpe", "random"), seeds: int = 8,
               n_trials: int = 3, target: float | None = None):
    spec = parse_spec({"name": "known", "model": "mnist_mlp", "dataset": "mnist", "search": SEARCH,
                       "objective": {"metric": metric}, "pruner": {"name": "none"},
                       "budget": {"n_trials": n_trials}})
    return parse_comparison(spec, {"samplers": list(samplers), "seeds": seeds}, target=target)


def result(sampler: str, seed: int, values: list[float], direction: str = "maximize",
           seconds: float = 2.0) -> MemberResult:
    return MemberResult(sampler, seed, oriented(values, direction), np.full(len(values), seconds), 10.0)


def test_a_minimised_objective_is_reported_in_its_own_units_with_its_interval_around_it() -> None:
    compared = comparison(metric="val_loss", target=0.3)
    results = [result(sampler, seed, [0.9, 0.5, loss + 0.01 * seed], "minimize")
               for seed in compared.seeds for sampler, loss in (("tpe", 0.2), ("random", 0.4))]
    report = build_report(compared, results)
    table = report.table.set_index("sampler")
    assert list(table.index) == ["tpe", "random"], "the lower loss ranks first"
    assert table.loc["tpe", "final_best_iqm"] == pytest.approx(0.2 + 0.01 * np.mean([2, 3, 4, 5]))
    for sampler in ("tpe", "random"):
        assert table.loc[sampler, "final_best_ci_low"] <= table.loc[sampler, "final_best_iqm"] \
            <= table.loc[sampler, "final_best_ci_high"]
    assert table.loc["tpe", "reached_target"] == "8/8" and table.loc["tpe", "trials_to_target"] == 3
    assert table.loc["tpe", "train_seconds_to_target"] == pytest.approx(6.0)
    assert table.loc["random", "reached_target"] == "0/8" and np.isnan(table.loc["random", "trials_to_target"])
    assert report.conclusion.startswith("tpe wins at 3 trials over 8 paired seeds")


def test_the_leader_beats_one_and_ties_another_and_few_seeds_decide_nothing() -> None:
    compared = comparison(samplers=("tpe", "random", "gp"))
    noise = [0.001, -0.002, 0.003, -0.001, 0.002, -0.003, 0.001, -0.002]
    results = [result(sampler, seed, [0.5, value]) for index, seed in enumerate(compared.seeds)
               for sampler, value in (("tpe", 0.95 + noise[index] / 10), ("random", 0.90),
                                      ("gp", 0.95 + noise[index]))]
    report = build_report(compared, results)
    assert report.conclusion.startswith(("tpe ranks first", "gp ranks first")), report.conclusion
    assert "beats random beyond seed noise" in report.conclusion and "within seed noise" in report.conclusion
    assert "also beyond it: " in report.conclusion and report.conclusion.endswith("beats random")
    few = [member for member in results if member.seed < compared.seeds[0] + 5]
    assert "needs at least 6 pairs" in build_report(compared, few).conclusion


def test_a_seed_missing_one_sampler_is_left_out_and_no_pair_is_refused() -> None:
    compared = comparison(seeds=3)
    results = [result("tpe", 0, [0.5]), result("random", 0, [0.6]), result("tpe", 1, [0.5])]
    assert build_report(compared, results).paired_seeds == (0,)
    with pytest.raises(Exception, match="no seed has a finished study for every sampler"):
        build_report(compared, results[2:])


def test_a_fused_trial_counts_its_share_of_the_pack_and_a_pruned_trial_no_best() -> None:
    compared = comparison(n_trials=2)
    study = optuna.create_study(direction="maximize")
    for value, state in ((0.8, optuna.trial.TrialState.COMPLETE), (None, optuna.trial.TrialState.PRUNED)):
        study.add_trial(optuna.trial.create_trial(
            value=value, state=state, params={"lr": 0.1},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)},
            user_attrs={"train_seconds": 8.0, "pack_size": 4}, intermediate_values={1: 0.5}))
    member = member_result(compared, "tpe", 0, study)
    assert member.seconds.tolist() == [2.0, 2.0]
    assert member.curve.tolist() == [0.8, 0.8] and member.final_best == 0.8
