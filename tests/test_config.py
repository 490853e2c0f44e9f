"""One settings source: every ``RunConfig`` field can be set from ``train --set``, a study spec and a benchmark file,
and a bad value gets the same one-line error in all three."""

from __future__ import annotations

import dataclasses

import pytest

from sweepbench.bench import parse_spec as parse_bench
from sweepbench.config import (BENCH_GRID, BENCH_UNSUPPORTED, ConfigError, RunConfig, bench_fields, field_names,
                               parse_overrides, searchable_fields)
from sweepbench.study.spec import parse_spec as parse_study
from sweepbench.tomlcheck import tomllib
from tests.conftest import run_cli

# A valid value for every field, as a user types it after --set and as TOML holds it.
VALID = {
    "model": ("cifar_cnn", "cifar_cnn"), "model_kwargs.hidden_size": ("64", 64), "dataset": ("cifar10", "cifar10"),
    "dataset_kwargs.num_classes": ("3", 3), "data_dir": ("/data", "/data"), "download": ("true", True),
    "val_size": ("100", 100), "train_subset": ("500", 500), "optimizer": ("sgd", "sgd"), "lr": ("0.01", 0.01),
    "momentum": ("0.9", 0.9), "nesterov": ("true", True), "weight_decay": ("1e-4", 1e-4), "lr_gamma": ("0.7", 0.7),
    "batch_size": ("128", 128), "eval_batch_size": ("500", 500), "epochs": ("3", 3), "seed": ("7", 7),
    "device": ("cpu", "cpu"), "precision": ("bf16", "bf16"), "compile": ("true", True),
    "step": ("compiled", "compiled"), "loader": ("torchvision", "torchvision"), "augment": ("true", True),
    "target_accuracy": ("0.9", 0.9), "checkpoint_dir": ("/tmp/c", "/tmp/c"),
    "resume": ("/tmp/c/last.pt", "/tmp/c/last.pt"),
}
BAD_VALUES = [  # (key, TOML value, what the one error line says)
    ("lr", "-1", "lr: -1 is out of range; it must be > 0"),
    ("optimizer", '"lbfgs"', "optimizer: 'lbfgs' is not allowed; choose one of: sgd, adam, adamw, rmsprop, adadelta"),
    ("epochs", "0", "epochs: 0 is out of range; it must be >= 1"),
    ("loader", '"pil"', "loader: 'pil' is not allowed; choose one of: device, torchvision"),
    ("step", '"jit"', "step: 'jit' is not allowed; choose one of: eager, compiled, graph"),
]
STUDY = 'name = "s"\nmodel = "mnist_mlp"\ndataset = "mnist"\n[train]\n{setting}\n[search.lr]\ntype = "float"\n' \
        'low = 0.001\nhigh = 0.1\n'
BENCH = '[grid]\nprecisions = ["cpu/fp32"]\n[[models]]\nmodel = "mnist_mlp"\n{setting}\n'


def test_every_field_has_a_value_above_and_a_view_in_each_entry_point():
    assert {key.split(".")[0] for key in VALID} == set(field_names())
    for key, (typed, _) in VALID.items():
        config = RunConfig.from_dict({**RunConfig().to_dict(), "optimizer": "sgd", "momentum": 0.5,
                                      **parse_overrides([f"{key}={typed}"])})
        head, _, argument = key.partition(".")
        value = getattr(config, head)[argument] if argument else getattr(config, head)
        assert value == VALID[key][1], key
    assert set(searchable_fields()) | {"model", "model_kwargs", "dataset", "dataset_kwargs", "data_dir",
                                       "download", "checkpoint_dir", "resume"} == set(field_names())
    assert bench_fields(BENCH_GRID) == ["device", "precision"]
    assert bench_fields(BENCH_UNSUPPORTED) == ["checkpoint_dir", "resume"]
    for f in dataclasses.fields(RunConfig):
        assert f.metadata["help"], f"{f.name} has no help"


@pytest.mark.parametrize("key, value, message", BAD_VALUES)
def test_a_bad_value_reads_the_same_from_train_a_study_spec_and_a_benchmark_file(key, value, message, tmp_path):
    completed = run_cli("train", "--set", f"{key}={value.strip(chr(34))}", cwd=tmp_path)
    assert completed.returncode == 2 and completed.stderr == f"sweepbench: error: {message}\n"
    assert not (tmp_path / "mlruns").exists()
    with pytest.raises(ConfigError, match=f"^<spec>: train.{message}$"):
        parse_study(tomllib.loads(STUDY.format(setting=f"{key} = {value}")))
    with pytest.raises(ConfigError, match=f"^models\\[0\\].{message}$"):
        parse_bench(tomllib.loads(BENCH.format(setting=f"{key} = {value}")), "b")


def test_set_merges_kwargs_and_refuses_unknown_keys_and_searched_settings(tmp_path):
    assert parse_overrides(["model_kwargs.hidden_size=64", "model_kwargs.dropout=0.1", "precision=bf16"]) == {
        "model_kwargs": {"hidden_size": 64, "dropout": 0.1}, "precision": "bf16"}
    with pytest.raises(ConfigError, match="--set colour: 'colour' is not allowed; choose one of: model, "):
        parse_overrides(["colour=red"])
    with pytest.raises(ConfigError, match="--set lr.x: only model_kwargs, dataset_kwargs take a .<argument>"):
        parse_overrides(["lr.x=1"])
    spec = tmp_path / "s.toml"
    spec.write_text(STUDY.format(setting="epochs = 1"))
    completed = run_cli("study", "run", str(spec), "--set", "lr=0.5", cwd=tmp_path)
    assert completed.returncode == 2
    assert completed.stderr == ("sweepbench: error: --set lr: searched by study 's'; remove it from the spec's "
                                "[search] to fix it\n")
    bench = tmp_path / "b.toml"
    bench.write_text(BENCH.format(setting=""))
    completed = run_cli("bench", str(bench), "--set", "precision=bf16", cwd=tmp_path)
    assert completed.returncode == 2 and "models[0].precision: set it through grid.precisions" in completed.stderr
    assert not (tmp_path / "mlruns").exists()
