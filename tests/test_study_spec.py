"""Study specs: the shipped files load, and each malformed spec fails with an error naming the field and the
allowed values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sweepbench.config import ConfigError
from sweepbench.study.spec import load_spec, parse_spec

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

STUDIES = Path(__file__).resolve().parents[1] / "studies"

VALID = """
name = "case"
model = "mnist_mlp"
dataset = "mnist"
[train]
epochs = 2
[search.lr]
type = "float"
low = 1e-4
high = 1e-1
log = true
"""


def _spec(extra: str = "", base: str = VALID) -> dict:
    return tomllib.loads(base + extra)


def _without(key: str) -> dict:
    data = _spec()
    del data[key]
    return data


MALFORMED = [
    ("unknown top-level key", {**_spec(), "colour": "red"},
     "spec: unknown key(s) ['colour']; allowed: name, description"),
    ("missing model", _without("model"), "model: missing"),
    ("empty search", {**_spec(), "search": {}}, "search: empty"),
    ("name with a slash", {**_spec(), "name": "a/b"}, "name: 'a/b' names files"),
    ("unknown model", {**_spec(), "model": "resnet"}, "model: unknown model 'resnet'; registered models: cifar_cnn"),
    ("unknown dataset", {**_spec(), "dataset": "imagenet"}, "dataset: unknown dataset 'imagenet'; registered"),
    ("unknown train field", _spec("[train.optimiser]\n"), "train: unknown key(s) ['optimiser']; allowed: model_kwargs"),
    ("model in [train]", _spec('[train.model_kwargs]\nwidth = 3\n'),
     "train.model_kwargs: ['width'] not accepted by model 'mnist_mlp'; allowed: hidden_size, dropout"),
    ("bad train value", tomllib.loads(VALID.replace("epochs = 2", "epochs = 0")),
     "train.epochs: 0 is out of range; it must be >= 1"),
    ("bad train choice", tomllib.loads(VALID.replace("epochs = 2", 'optimizer = "lbfgs"')),
     "train.optimizer: 'lbfgs' is not allowed; choose one of: sgd, adam, adamw, rmsprop, adadelta"),
    ("unknown sampler", _spec('[sampler]\nname = "bayes"'),
     "sampler.name: 'bayes' is not allowed; choose one of: tpe, random, cmaes, gp, grid"),
    ("unknown sampler key", _spec('[sampler]\nseeed = 1'), "sampler: unknown key(s) ['seeed']; allowed: name, seed"),
    ("seed not an integer", _spec('[sampler]\nseed = "one"'), "sampler.seed: expected an integer, got 'one'"),
    ("startup for random", _spec('[sampler]\nname = "random"\nn_startup_trials = 3'),
     "sampler.n_startup_trials: the 'random' sampler has no startup phase"),
    ("unknown pruner", _spec('[pruner]\nname = "asha"'),
     "pruner.name: 'asha' is not allowed; choose one of: median, hyperband, none"),
    ("option of another pruner", _spec('[pruner]\nname = "median"\nmin_resource = 2'),
     "pruner (median): unknown key(s) ['min_resource']; allowed: name, n_startup_trials, n_warmup_steps"),
    ("hyperband halving by one", _spec('[pruner]\nname = "hyperband"\nreduction_factor = 1'),
     "pruner.reduction_factor: 1 is out of range; it must be >= 2"),
    ("zero trials", _spec("[budget]\nn_trials = 0"), "budget.n_trials: 0 is out of range; it must be >= 1"),
    ("negative timeout", _spec("[budget]\ntimeout = -5"), "budget.timeout: -5 is out of range; it must be > 0"),
    ("unknown budget key", _spec("[budget]\ntrials = 3"),
     "budget: unknown key(s) ['trials']; allowed: n_trials, timeout, max_failed_trials"),
    ("unknown metric", _spec('[objective]\nmetric = "f1"'),
     "objective.metric: 'f1' is not allowed; choose one of: val_accuracy, val_loss, train_seconds"),
    ("bad direction", _spec('[objective]\ndirection = "up"'),
     "objective.direction: 'up' is not allowed; choose one of: maximize, minimize"),
    ("three objectives", {**_spec(), "objective": [{"metric": "val_accuracy"}] * 3},
     "objective: expected one table, or an array of two tables"),
    ("same metric twice", {**_spec(), "objective": [{"metric": "val_loss"}, {"metric": "val_loss"}]},
     "objective: both objectives are 'val_loss'"),
    ("pruning a Pareto study", {**_spec('[pruner]\nname = "median"'),
                                "objective": [{"metric": "val_accuracy"}, {"metric": "train_seconds"}]},
     "pruner.name: 'median' cannot prune a multi-objective study; use 'none'"),
    ("pruning on seconds", _spec('[objective]\nmetric = "train_seconds"'),
     "pruner.name: 'median' needs a per-epoch first objective"),
    ("cmaes on a Pareto study", {**_spec('[sampler]\nname = "cmaes"'),
                                 "objective": [{"metric": "val_accuracy"}, {"metric": "train_seconds"}]},
     "sampler.name: 'cmaes' is single-objective"),
    ("unknown param type", _spec('[search.momentum]\ntype = "uniform"\nlow = 0\nhigh = 1'),
     "search.momentum.type: 'uniform' is not allowed; choose one of: int, float, categorical"),
    ("unsearchable field", _spec('[search.model]\ntype = "categorical"\nchoices = ["cifar_cnn"]'),
     "search.model: not a searchable field; allowed: val_size, train_subset"),
    ("unknown field", _spec('[search.learning_rate]\ntype = "float"\nlow = 0.1\nhigh = 1'),
     "search.learning_rate: not a searchable field; allowed: val_size, train_subset, optimizer, lr"),
    ("unknown model kwarg", _spec('[search."model_kwargs.width"]\ntype = "int"\nlow = 1\nhigh = 4'),
     "search.model_kwargs.width: ['width'] not accepted by model 'mnist_mlp'; allowed: hidden_size, dropout"),
    ("bad dotted name", _spec('[search."train.lr"]\ntype = "float"\nlow = 0.1\nhigh = 1'),
     "search.train.lr: dotted names must be model_kwargs.<arg> or dataset_kwargs.<arg>"),
    ("searched and fixed", _spec('[train.model_kwargs]\nhidden_size = 3\n[search."model_kwargs.hidden_size"]\n'
                                 'type = "int"\nlow = 1\nhigh = 4'),
     "search.model_kwargs.hidden_size: also fixed in [train].model_kwargs"),
    ("searched and fixed in [train]", _spec('[search.epochs]\ntype = "int"\nlow = 1\nhigh = 4'),
     "search.epochs: also fixed in [train]; keep it in one place"),
    ("missing high", _spec('[search.momentum]\ntype = "float"\nlow = 0'),
     "search.momentum.high: missing; a float parameter needs low and high"),
    ("low above high", _spec('[search.momentum]\ntype = "float"\nlow = 0.9\nhigh = 0.1'),
     "search.momentum: low (0.9) must be <= high (0.1)"),
    ("float int param", _spec('[search.seed]\ntype = "int"\nlow = 1.5\nhigh = 4'),
     "search.seed.low: expected an integer, got 1.5"),
    ("log from zero", _spec('[search.weight_decay]\ntype = "float"\nlow = 0\nhigh = 0.1\nlog = true'),
     "search.weight_decay.low: 0.0 must be > 0 with log = true"),
    ("log and step", _spec('[search.momentum]\ntype = "float"\nlow = 0.1\nhigh = 0.9\nlog = true\nstep = 0.1'),
     "search.momentum: log = true cannot be combined with step"),
    ("negative step", _spec('[search.seed]\ntype = "int"\nlow = 1\nhigh = 4\nstep = -1'),
     "search.seed.step: -1 is out of range; it must be > 0"),
    ("choices key on int", _spec('[search.seed]\ntype = "int"\nlow = 1\nhigh = 4\nchoices = [1]'),
     "search.seed (int): unknown key(s) ['choices']; allowed: type, low, high, step, log"),
    ("empty choices", _spec('[search.optimizer]\ntype = "categorical"\nchoices = []'),
     "search.optimizer.choices: expected a non-empty array of values"),
    ("choice the config rejects", _spec('[search.optimizer]\ntype = "categorical"\nchoices = ["adam", "lbfgs"]'),
     "search.optimizer: optimizer: 'lbfgs' is not allowed; choose one of: sgd, adam"),
    ("range the config rejects", _spec('[search.batch_size]\ntype = "int"\nlow = 0\nhigh = 64'),
     "search.batch_size: batch_size: 0 is out of range; it must be >= 1"),
    ("grid without step", _spec('[sampler]\nname = "grid"'),
     "search.lr: the grid sampler needs a step (or type categorical)"),
]


@pytest.mark.parametrize("data, message", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_a_malformed_spec_names_its_field_and_the_allowed_values(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_spec(data, "case.toml")
    assert str(caught.value).startswith("case.toml: ")
    assert message in str(caught.value)


def test_a_file_that_is_not_toml_says_so(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_spec(path)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere.toml not found"):
        load_spec(tmp_path / "nowhere.toml")


@pytest.mark.parametrize("name", ["mnist_mlp", "mnist_mlp_quick", "cifar_cnn", "cifar_cnn_quick"])
def test_the_shipped_specs_load(name: str) -> None:
    spec = load_spec(STUDIES / f"{name}.toml")
    assert spec.name == name
    params = {param.name for param in spec.search}
    assert {"model_kwargs.hidden_size", "lr", "batch_size", "optimizer"} <= params
    assert spec.metric_names == ["val_accuracy"] and spec.directions == ["maximize"]


def test_defaults_and_a_pareto_study() -> None:
    spec = parse_spec(_spec())
    assert (spec.sampler, spec.pruner, spec.n_trials, spec.max_failed_trials) == ("tpe", "median", 20, 20)
    pareto = parse_spec({**_spec(), "objective": [{"metric": "val_accuracy"}, {"metric": "train_seconds"}]})
    assert pareto.directions == ["maximize", "minimize"] and pareto.pruner == "none"


def test_the_grid_sampler_stops_at_the_size_of_its_grid() -> None:
    spec = parse_spec(_spec('[sampler]\nname = "grid"\n[budget]\nn_trials = 100\n'
                            '[search.batch_size]\ntype = "int"\nlow = 32\nhigh = 128\nstep = 32\n'
                            '[search.optimizer]\ntype = "categorical"\nchoices = ["sgd", "adam"]\n',
                            base=VALID.replace("log = true", "step = 0.05")))
    assert [param.grid_values() for param in spec.search][1] == [32, 64, 96, 128]
    assert parse_spec(_spec('[search.seed]\ntype = "int"\nlow = 1\nhigh = 3\n')).search[1].grid_values() == [1, 2, 3]
    assert spec.target_trials() == len(spec.search[0].grid_values()) * 4 * 2


def test_overrides_are_validated_like_the_spec() -> None:
    spec = parse_spec(_spec()).with_overrides(n_trials=3, device="cpu", data_dir=None)
    assert spec.n_trials == 3 and spec.base_config.device == "cpu"
    with pytest.raises(ConfigError, match="--n-trials: 0 is out of range"):
        spec.with_overrides(n_trials=0)
    with pytest.raises(ConfigError, match="precision: 'fp64' is not allowed"):
        spec.with_overrides(precision="fp64")


def test_an_unknown_sampler_is_refused_by_the_factory_not_run_as_another() -> None:
    """The spec's choices and the factory read one registry: a name that reaches the factory unchecked (a spec
    made in code) is refused, never run as a grid."""
    import dataclasses

    from sweepbench.study.samplers import create_sampler, sampler_names

    spec = parse_spec(_spec())
    assert sampler_names() == ("tpe", "random", "cmaes", "gp", "grid")
    assert type(create_sampler(dataclasses.replace(spec, sampler="random"), 0)).__name__ == "RandomSampler"
    with pytest.raises(ConfigError, match="sampler: unknown sampler 'bayes'; registered samplers: cmaes, gp, grid"):
        create_sampler(dataclasses.replace(spec, sampler="bayes"), 0)
