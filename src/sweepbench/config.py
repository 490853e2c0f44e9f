"""The run configuration: one dataclass, validated on creation, that every command fills in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adadelta")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
LOADERS = ("device", "torchvision")


class ConfigError(ValueError):
    """A bad setting. The message names the field and the allowed values."""


@dataclass
class RunConfig:
    model: str = "mnist_mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "mnist"
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    download: bool = False
    val_size: int = 5000
    train_subset: int | None = None
    optimizer: str = "adadelta"
    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_gamma: float = 1.0
    batch_size: int = 64
    eval_batch_size: int = 1000
    epochs: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    loader: str = "device"
    augment: bool = False
    target_accuracy: float | None = None
    checkpoint_dir: str | None = None
    resume: str | None = None

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


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _at_least(name: str, value: Any, low: float, inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if value < low or (not inclusive and value == low):
        bound = f">= {low}" if inclusive else f"> {low}"
        raise ConfigError(f"{name}: {value!r} is out of range; it must be {bound}")


def validate(config: RunConfig) -> None:
    """Checks values that need no registry or hardware; names are checked where they are looked up."""
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("device", config.device, DEVICES)
    _choice("precision", config.precision, PRECISIONS)
    _choice("loader", config.loader, LOADERS)
    _at_least("lr", config.lr, 0, inclusive=False)
    _at_least("momentum", config.momentum, 0)
    _at_least("weight_decay", config.weight_decay, 0)
    _at_least("lr_gamma", config.lr_gamma, 0, inclusive=False)
    for name in ("batch_size", "eval_batch_size", "epochs"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        _at_least(name, value, 1)
    _at_least("val_size", config.val_size, 0)
    if config.train_subset is not None:
        _at_least("train_subset", config.train_subset, 1)
    if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
        raise ConfigError(f"target_accuracy: {config.target_accuracy!r} must be in (0, 1]")
    if config.nesterov and (config.optimizer != "sgd" or config.momentum <= 0):
        raise ConfigError("nesterov: needs optimizer 'sgd' with momentum > 0")
    if not isinstance(config.model_kwargs, dict) or not isinstance(config.dataset_kwargs, dict):
        raise ConfigError("model_kwargs and dataset_kwargs: expected tables (dicts)")
