"""The run configuration: one flat block of settings, validated on creation, that every command fills in.

``RunConfig`` is the one source of a run's settings. Each field's metadata says what it means (``help``), which
values it takes (``choices``), whether a study may search it (``searchable``) and what a benchmark file does
with it (``bench``: set per file, owned by the grid, or unsupported). The ``train`` flags, ``--set KEY=VALUE``
(``train``, ``study run``, ``bench``), study specs and benchmark files are all views of these fields, checked by
the same ``validate``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from .devices import device_choices
from .precisions import baseline_precision, precision_choices, precision_help, trap
from .steps import check_step_settings, step_choices, step_help
from .validators import ConfigError, at_least, boolean, choice, integer, number, string, table

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adadelta")
DEVICES = device_choices()
PRECISIONS = precision_choices()
STEPS = step_choices()
LOADERS = ("device", "torchvision")
KWARGS_FIELDS = ("model_kwargs", "dataset_kwargs")
BENCH_GRID = "grid"  # a benchmark file sets these through grid.precisions
BENCH_UNSUPPORTED = "unsupported"


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[str] = (), searchable: bool = True,
            bench: str | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A ``RunConfig`` field with its metadata (see the module docstring)."""
    metadata = {"help": help, "choices": tuple(choices), "searchable": searchable, "bench": bench}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    model: str = setting("mnist_mlp", help="registered model (sweepbench models)", searchable=False)
    model_kwargs: dict[str, Any] = setting(factory=dict, help="model keyword arguments",
                                           searchable=False)
    dataset: str = setting("mnist", help="registered dataset (sweepbench datasets)", searchable=False)
    dataset_kwargs: dict[str, Any] = setting(factory=dict, help="dataset keyword arguments", searchable=False)
    data_dir: str | None = setting(None, help="folder with <dataset>.npz or torchvision's layout", searchable=False)
    download: bool = setting(False, help="let torchvision download a missing dataset", searchable=False)
    val_size: int = setting(5000, help="validation images carved from the training set")
    train_subset: int | None = setting(None, help="train on the first N training images only")
    optimizer: str = setting("adadelta", help="optimizer", choices=OPTIMIZERS)
    lr: float = setting(1.0, help="learning rate")
    momentum: float = setting(0.0, help="momentum (sgd, rmsprop)")
    nesterov: bool = setting(False, help="Nesterov momentum (sgd with momentum > 0)")
    weight_decay: float = setting(0.0, help="weight decay")
    lr_gamma: float = setting(1.0, help="learning-rate decay per epoch (StepLR)")
    batch_size: int = setting(64, help="training batch size")
    eval_batch_size: int = setting(128, help="evaluation batch size")
    epochs: int = setting(1, help="epochs")
    seed: int = setting(0, help="seed of initialisation and data order")
    device: str = setting("auto", help="device", choices=DEVICES, bench=BENCH_GRID)
    precision: str = setting(baseline_precision(), help=precision_help(), choices=PRECISIONS,
                             bench=BENCH_GRID)
    compile: bool = setting(False, help="torch.compile the model")
    step: str = setting(STEPS[0], help=step_help(), choices=STEPS)
    loader: str = setting("device", help="input path", choices=LOADERS)
    augment: bool = setting(False, help="random crop + flip (CIFAR)")
    target_accuracy: float | None = setting(None, help="validation accuracy for time-to-target")
    checkpoint_dir: str | None = setting(None, help="folder for best.pt and last.pt", searchable=False,
                                         bench=BENCH_UNSUPPORTED)
    resume: str | None = setting(None, help="checkpoint to continue from", searchable=False, bench=BENCH_UNSUPPORTED)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; allowed: {', '.join(field_names())}")
        return cls(**values)


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(RunConfig)


def field_names() -> list[str]:
    return [f.name for f in fields()]


def searchable_fields() -> list[str]:
    return [f.name for f in fields() if f.metadata["searchable"]]


def bench_fields(role: str) -> list[str]:
    """The fields a benchmark file treats as ``role`` (``BENCH_GRID`` or ``BENCH_UNSUPPORTED``)."""
    return [f.name for f in fields() if f.metadata["bench"] == role]


def error_within(label: str, error: ConfigError) -> ConfigError:
    """A config error as seen from the table ``label`` it came from: a field's error gets the field's path
    (``train`` + ``lr: ...`` -> ``train.lr: ...``), any other error the table's name in front."""
    message = str(error)
    field_error = message.split(":", 1)[0].split(".")[0] in field_names()
    return ConfigError(f"{label}{'.' if field_error else ': '}{message}")


TYPE_CHECKS = {"str": string, "int": integer, "float": number, "bool": boolean, "dict[str, Any]": table}


def _check_type(name: str, annotation: str, value: Any) -> None:
    """The field's type from its annotation (``int | None`` allows None); an int passes as a float."""
    kind, _, optional = annotation.partition(" | ")
    if not (optional and value is None):
        TYPE_CHECKS[kind](name, value)


def validate(config: RunConfig) -> None:
    """Checks values that need no registry or hardware; names are checked where they are looked up."""
    for f in fields():
        _check_type(f.name, f.type, getattr(config, f.name))
        if f.metadata["choices"]:
            choice(f.name, getattr(config, f.name), f.metadata["choices"])
    at_least("lr", config.lr, 0, inclusive=False)
    at_least("momentum", config.momentum, 0)
    at_least("weight_decay", config.weight_decay, 0)
    at_least("lr_gamma", config.lr_gamma, 0, inclusive=False)
    for name in ("batch_size", "eval_batch_size", "epochs", "val_size"):  # models are chosen on val_size
        at_least(name, getattr(config, name), 1)
    if config.train_subset is not None:
        at_least("train_subset", config.train_subset, 1)
    if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
        raise ConfigError(f"target_accuracy: {config.target_accuracy!r} must be in (0, 1]")
    if config.nesterov and (config.optimizer != "sgd" or config.momentum <= 0):
        raise ConfigError("nesterov: needs optimizer 'sgd' with momentum > 0")
    check_step_settings(config.step, config.precision, config.compile)


class SettingWarning(UserWarning):
    """A legal setting that is almost surely a mistake: said in one line when a run starts."""


MOMENTUM_OPTIMIZERS = ("sgd", "rmsprop")


def advice(config: RunConfig, device_type: str, train_size: int) -> list[str]:
    """What a run's settings, legal as they are, probably get wrong on ``device_type`` with ``train_size``
    training images."""
    notes = []
    precision_trap = trap(config.precision, device_type)
    if precision_trap:
        notes.append(precision_trap)
    if config.momentum and config.optimizer not in MOMENTUM_OPTIMIZERS:
        notes.append(f"momentum: {config.momentum} is ignored by optimizer {config.optimizer!r}; it applies to "
                     f"{', '.join(MOMENTUM_OPTIMIZERS)}")
    if config.batch_size > train_size:
        notes.append(f"batch_size: {config.batch_size} is larger than the {train_size} training images, so each "
                     "epoch is one smaller step")
    return notes


def parse_value(text: str) -> Any:
    """A command-line value as TOML reads it (``64`` -> 64, ``1e-3`` -> 0.001, ``true`` -> True), else as text
    (``bf16``, ``/data``)."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: Sequence[str], option: str = "--set", prefix: str = "") -> dict[str, Any]:
    """``["lr=0.1", "model_kwargs.hidden_size=64"]`` -> ``{"lr": 0.1, "model_kwargs": {"hidden_size": 64}}``,
    every key a ``RunConfig`` field (or ``<kwargs field>.<argument>``); ``prefix`` goes before each key
    (``--model-arg hidden_size=64`` is ``model_kwargs.`` + ``hidden_size=64``)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option}: expected KEY=VALUE, got {pair!r}")
        key = prefix + key
        head, _, argument = key.partition(".")
        choice(f"{option} {key}", head, field_names())
        if argument and head not in KWARGS_FIELDS:
            raise ConfigError(f"{option} {key}: only {', '.join(KWARGS_FIELDS)} take a .<argument>")
        if argument:
            overrides.setdefault(head, {})[argument] = parse_value(text)
        else:
            overrides[head] = parse_value(text)
    return overrides


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over a dict of RunConfig fields; kwargs tables are merged argument by argument."""
    merged = dict(values)
    for key, value in overrides.items():
        merged[key] = {**merged.get(key, {}), **value} if key in KWARGS_FIELDS else value
    return merged
