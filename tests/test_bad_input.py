"""Bad input, as a table of cases a user types and as fuzzing: one line, exit status 2, nothing created.

Checkpoints are in tests/test_bad_checkpoints.py, URLs, stores and output paths in tests/test_bad_urls.py.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweepbench.bench import parse_spec as parse_bench
from sweepbench.cli import build_parser, config_from_args
from sweepbench.config import ConfigError
from sweepbench.models import check_fits, check_model_kwargs
from sweepbench.data import get_dataset_entry
from sweepbench.study.spec import parse_spec as parse_study
from tests.conftest import SHARED_DATA, assert_refused, run_cli

SPEC = 'name = "{name}"\nmodel = "mnist_mlp"\ndataset = "mnist"\n{top}\n[sampler]\nname = "{sampler}"\n{sampler_extra}\n' \
       '[budget]\nn_trials = 2\n{budget}\n[search."model_kwargs.hidden_size"]\ntype = "int"\nlow = {low}\nhigh = 64\n' \
       '{step}\n'


def spec(name: str = "s", top: str = "", sampler: str = "random", sampler_extra: str = "", budget: str = "",
         low: int = 16, step: str = "") -> str:
    return SPEC.format(name=name, top=top, sampler=sampler, sampler_extra=sampler_extra, budget=budget, low=low,
                       step=step)


def npz(folder: Path, **changes) -> Path:
    """A small mnist.npz made from the real one, with ``changes`` applied (a bad shape, bad labels...)."""
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(SHARED_DATA / "mnist.npz") as real:
        arrays = {"x_train": real["x_train"][:2000], "y_train": real["y_train"][:2000].astype(np.int64),
                  "x_test": real["x_test"][:500], "y_test": real["y_test"][:500].astype(np.int64)}
    for key, change in changes.items():
        arrays[key] = change(arrays[key])
    np.savez(folder / "mnist.npz", **arrays)
    return folder


def with_label(value: int):
    def change(labels):
        labels[7] = value
        return labels
    return change


TRAIN_CASES = {  # name: (train arguments, what the one line says)
    "lr nan": (["--lr", "nan"], r"lr: expected a finite number, got nan"),
    "lr inf": (["--lr", "inf"], r"lr: expected a finite number, got inf"),
    "momentum nan": (["--momentum", "nan"], r"momentum: expected a finite number"),
    "lr-gamma nan": (["--lr-gamma", "nan"], r"lr_gamma: expected a finite number"),
    "lr zero": (["--lr", "0"], r"lr: 0.0 is out of range; it must be > 0"),
    "hidden size text": (["--model-arg", "hidden_size=abc"], r"model_kwargs.hidden_size: expected an integer"),
    "hidden size negative": (["--model-arg", "hidden_size=-5"], r"hidden_size: -5 is out of range; it must be in \[1"),
    "hidden size zero": (["--model-arg", "hidden_size=0"], r"hidden_size: 0 is out of range"),
    "dropout negative": (["--model-arg", "dropout=-3.0"], r"dropout: -3.0 is out of range; it must be in \[0.0, 1.0\)"),
    "unknown model argument": (["--model-arg", "width=3"], r"model_kwargs: \['width'\] not accepted by model"),
    "model argument without value": (["--model-arg", "hidden_size"], r"--model-arg: expected KEY=VALUE"),
    "mlp on cifar": (["--dataset", "cifar10"], r"model: 'mnist_mlp' takes images of shape \(1, 28, 28\).*cifar_cnn"),
    "cnn on mnist": (["--model", "cifar_cnn"], r"model: 'cifar_cnn' takes images of shape \(3, 32, 32\).*mnist_mlp"),
    "unknown model": (["--model", "resnet"], r"model: unknown model 'resnet'; registered models: cifar_cnn"),
    "unknown dataset": (["--dataset", "imagenet"], r"dataset: unknown dataset 'imagenet'; registered datasets:"),
    "val size zero": (["--val-size", "0"], r"val_size: 0 is out of range; it must be >= 1"),
    "unknown optimizer": (["--optimizer", "lbfgs"], r"optimizer: 'lbfgs' is not allowed; choose one of: sgd"),
    "tf32 on cpu": (["--device", "cpu", "--precision", "tf32"], r"precision: 'tf32' needs device cuda"),
    "nesterov with adam": (["--optimizer", "adam", "--nesterov"], r"nesterov: needs optimizer 'sgd'"),
    "unknown --set key": (["--set", "colour=red"], r"--set colour: 'colour' is not allowed; choose one of: model,"),
    "batch size text": (["--set", "batch_size=big"], r"batch_size: expected an integer, got 'big'"),
    "checkpoint dir in /proc": (["--checkpoint-dir", "/proc/x"], r"--checkpoint-dir: cannot write in /proc/x: "
                                                                 r"nothing can be created in /proc"),
    "one seed": (["--seeds", "3"], r"--seeds: '3' must list 2 to 1024 distinct seeds >= 0"),
    "seeds not numbers": (["--seeds", "a,b"], r"--seeds: 'a,b' is not a comma-separated list of integers"),
    "seed twice": (["--seeds", "0,0"], r"--seeds: '0,0' must list 2 to 1024 distinct seeds"),
    "negative seed": (["--seeds", "0,-1"], r"--seeds: '0,-1' must list 2 to 1024 distinct seeds >= 0"),
    "seeds with torchvision": (["--seeds", "0,1", "--loader", "torchvision"],
                               r"loader: member 0 has 'torchvision'; fused training batches on the device"),
    "seeds with fp16": (["--seeds", "0,1", "--precision", "fp16"], r"precision: member 0 has 'fp16'; fp16 needs a"),
    "seeds with compile": (["--seeds", "0,1", "--compile"], r"compile: member 0 has True; fused training runs"),
    "unknown step": (["--step", "jit"], r"step: 'jit' is not allowed; choose one of: eager, compiled, graph"),
    "graph step on cpu": (["--device", "cpu", "--step", "graph"],
                          r"step: 'graph' needs device cuda, got cpu; on cpu use eager, compiled"),
    "compiled step with fp16": (["--step", "compiled", "--precision", "fp16"],
                                r"step: 'compiled' cannot train precision 'fp16': its GradScaler skips a step"),
    "compiled step with compile": (["--step", "compiled", "--compile"],
                                   r"step: 'compiled' compiles the whole step already, and compile = true would"),
}
DATA_CASES = {  # name: (how to spoil the file, what the one line says)
    "truncated npz": (lambda folder: (folder.mkdir(parents=True), (folder / "mnist.npz").write_bytes(
        (SHARED_DATA / "mnist.npz").read_bytes()[:300_000])), r"mnist.npz: not a readable .npz file"),
    "images 20x20": (lambda folder: npz(folder, x_train=lambda x: x[:, :20, :20], x_test=lambda x: x[:, :20, :20]),
                     r"images of shape \(1, 20, 20\).*dataset 'mnist' has \(1, 28, 28\)"),
    "label 12": (lambda folder: npz(folder, y_train=with_label(12)), r"labels from 0 to 12; dataset 'mnist' has 10"),
    "label -1": (lambda folder: npz(folder, y_test=with_label(-1)), r"test labels from -1 to 9"),
    "keys missing": (lambda folder: (folder.mkdir(parents=True), np.savez(folder / "mnist.npz", x=np.zeros(3))),
                     r"mnist.npz: missing keys \['x_test', 'x_train', 'y_test', 'y_train'\]"),
}
SPEC_CASES = {  # name: (spec text, what the one line says)
    "name of 300 characters": (spec(name="a" * 300), r"name: 'a{40}'... names files and databases; use at most 100"),
    "sampler seed -1": (spec(sampler_extra="seed = -1"), r"sampler.seed: -1 is out of range; it must be >= 0"),
    "sampler seed 2**63-1": (spec(sampler_extra=f"seed = {2**63 - 1}"),
                             r"sampler.seed: 9223372036854775807 is out of range; it must be in \[0, 4294967295\]"),
    "timeout nan": (spec(budget="timeout = nan"), r"budget.timeout: expected a finite number, got nan"),
    "hidden size range below 1": (spec(low=0), r"search.model_kwargs.hidden_size: 0 is out of range"),
    "step larger than range": (spec(step="step = 100"), r"hidden_size.step: 100 is larger than the range \[16, 64\]"),
    "huge grid": (spec(sampler="grid") + '[search.seed]\ntype = "int"\nlow = 0\nhigh = 2000000\n',
                  r"search: the grid has 98,000,049 points, more than budget.max_grid_points = 100,000"),
    "model on another dataset": (spec().replace('dataset = "mnist"', 'dataset = "cifar10"'),
                                 r"model: 'mnist_mlp' takes images of shape"),
    "dropout -3 fixed": (spec(top='[train]\nmodel_kwargs = { dropout = -3.0 }'),
                         r"train.model_kwargs.dropout: -3.0 is out of range"),
    "pack 0": (spec(budget="pack = 0"), r"budget.pack: 0 is out of range; it must be >= 1"),
    "pack with torchvision": (spec(top='[train]\nloader = "torchvision"', budget="pack = 4"),
                              r"budget.pack: 4 trains trials fused, which needs loader = 'device'"),
    "pack with fp16": (spec(top='[train]\nprecision = "fp16"', budget="pack = 4"),
                       r"budget.pack: 4 trains trials fused, which needs precision other than 'fp16'"),
    "pack with searched compile": (spec(budget="pack = 2") + '[search.compile]\ntype = "categorical"\n'
                                   'choices = [true, false]\n',
                                   r"budget.pack: 2 trains trials fused, which needs compile = False \(fixed, not "
                                   r"searched\)"),
    "keep checkpoints some": (spec(budget='keep_checkpoints = "some"'),
                              r"budget.keep_checkpoints: 'some' is not allowed; choose one of: best, all, none"),
}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty folder to run in: whatever a refused command leaves there is a failure."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("args, message", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_train_refuses_in_one_line(args, message, workdir):
    assert_refused(["train", "--data-dir", str(SHARED_DATA), *args], message, workdir)


@pytest.mark.parametrize("spoil, message", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_a_bad_data_file_is_named_in_one_line(spoil, message, workdir, tmp_path):
    spoil(tmp_path / "data")
    assert_refused(["train", "--data-dir", str(tmp_path / "data"), "--val-size", "100", "--tracking-uri",
                    f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"], message, workdir)
    assert not (tmp_path / "store").exists(), "a refused run leaves no MLflow store behind"


@pytest.mark.parametrize("text, message", SPEC_CASES.values(), ids=SPEC_CASES.keys())
def test_study_run_refuses_a_bad_spec_in_one_line(text, message, workdir, tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    assert_refused(["study", "run", str(path), "--data-dir", str(SHARED_DATA)], message, workdir)


def test_a_spec_that_is_not_utf8_is_one_line(workdir, tmp_path):
    path = tmp_path / "spec.toml"
    path.write_bytes(spec().encode() + b"# \xff\xfe caf\xe9\n")
    assert_refused(["study", "run", str(path)], r"spec.toml: not UTF-8 text \(byte \d+\); save the study spec as UTF-8",
                   workdir)


# ---- fuzzing: any input ends in a result or one clean ConfigError, never another exception ---------------------

TOML_VALUES = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                        st.text(string.printable, max_size=12), st.lists(st.integers(-5, 300), max_size=3))
FIELDS = ["lr", "momentum", "epochs", "batch_size", "val_size", "train_subset", "optimizer", "precision", "device",
          "seed", "lr_gamma", "weight_decay", "nesterov", "target_accuracy", "loader", "compile", "eval_batch_size"]


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") \
            .replace("\t", "\\t").replace("\x0b", "\\u000b").replace("\x0c", "\\f") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_literal, value)) + "]"
    return str(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), TOML_VALUES, max_size=4),
       st.fixed_dictionaries({"type": st.sampled_from(["int", "float", "categorical", "bool"])},
                             optional={key: TOML_VALUES for key in ("low", "high", "step", "log", "choices")}),
       st.sampled_from(["tpe", "random", "grid", "cmaes", "gp", "nope"]), TOML_VALUES)
def test_fuzzed_study_specs_parse_or_give_one_config_error(train, search, sampler, seed):
    from sweepbench.tomlcheck import tomllib

    text = ('name = "fuzz"\nmodel = "mnist_mlp"\ndataset = "mnist"\n[train]\n'
            + "".join(f"{key} = {toml_literal(value)}\n" for key, value in train.items())
            + f'[sampler]\nname = "{sampler}"\nseed = {toml_literal(seed)}\n[search."model_kwargs.hidden_size"]\n'
            + "".join(f"{key} = {toml_literal(value)}\n" for key, value in search.items()))
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # the generator wrote something TOML itself refuses (its error is the reader's one line)
    try:
        parse_study(document)
    except ConfigError as error:
        assert "\n" not in str(error) and str(error).startswith("<spec>: ")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS + ["model", "dataset", "precisions", "batch_sizes", "label"]),
                       TOML_VALUES, max_size=4))
def test_fuzzed_benchmark_files_parse_or_give_one_config_error(entry):
    from sweepbench.tomlcheck import tomllib

    text = '[grid]\nprecisions = ["cpu/fp32"]\n[[models]]\n' + "".join(
        f"{key} = {toml_literal(value)}\n" for key, value in entry.items())
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    try:
        parse_bench(document, "fuzz")
    except ConfigError as error:
        assert "\n" not in str(error)


FLAG_VALUES = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats().map(str),
                        st.sampled_from(["nan", "inf", "-1", "0", "", "true", "sgd", "bf16", "cuda", "1e999"]),
                        st.text(string.printable, max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["--lr", "--epochs", "--batch-size", "--optimizer", "--precision",
                                           "--model", "--dataset", "--val-size", "--seed", "--momentum",
                                           "--model-arg", "--set", "--train-subset", "--loader"]), FLAG_VALUES),
                max_size=4))
def test_fuzzed_train_command_lines_give_a_config_or_one_clean_error(flags):
    """The checks ``train`` makes before any data loads: parsing, the config, the model's arguments and its fit
    with the dataset. argparse's own refusals exit 2 with its usage line."""
    argv = ["train", *[part for flag, value in flags for part in (flag, value)]]
    try:
        args = build_parser().parse_args(argv)
        config = config_from_args(args)
        check_model_kwargs(config.model, config.model_kwargs)
        check_fits(config.model, get_dataset_entry(config.dataset).image_shape, config.dataset)
    except SystemExit as exit_:
        assert exit_.code == 2
    except ConfigError as error:
        assert "\n" not in str(error) and str(error)


def test_legal_but_suspicious_settings_get_one_warning_line_each(workdir):
    completed = run_cli("train", "--data-dir", str(SHARED_DATA), "--no-mlflow", "--device", "cpu",
                        "--precision", "fp16", "--optimizer", "adam", "--lr", "0.001", "--momentum", "0.9",
                        "--train-subset", "100", "--val-size", "100", "--batch-size", "256",
                        "--model-arg", "hidden_size=16", cwd=workdir)
    assert completed.returncode == 0, completed.stderr
    warnings = [line for line in completed.stderr.splitlines() if line.startswith("sweepbench: warning: ")]
    assert [line.split(": ")[2] for line in warnings] == ["precision", "momentum", "batch_size"], warnings
    assert "batch_size: 256 is larger than the 100 training images" in warnings[2]
    assert "Traceback" not in completed.stderr
