"""Model registry: one decorated factory per model; CLI, studies and benchmarks read it.

Factory keyword arguments are what studies sweep, so they have plain names (``hidden_size``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .registry import Registry
from .validators import ConfigError, integer, number


# Allowed ranges of the keyword arguments the models share: (low, high), both included; a float's high is
# excluded where the name says so in ``EXCLUSIVE_HIGH``.
ARGUMENT_RANGES = {"hidden_size": (1, 1 << 16), "dropout": (0.0, 1.0), "num_classes": (2, 1 << 16)}
EXCLUSIVE_HIGH = ("dropout",)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str

    def defaults(self) -> dict[str, Any]:
        params = inspect.signature(self.factory).parameters.values()
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(input_shape: tuple[int, ...]) -> Callable:
    """Registers a factory under its function name; ``input_shape`` is one sample's (C, H, W)."""

    def entry(factory: Callable[..., nn.Module]) -> ModelEntry:
        doc = (factory.__doc__ or "").strip().splitlines()
        return ModelEntry(factory.__name__, factory, tuple(input_shape), doc[0] if doc else "")

    return MODELS.decorator(entry)


def list_models() -> list[str]:
    return MODELS.names()


def get_model_entry(name: str) -> ModelEntry:
    return MODELS.get(name)


def check_model_kwargs(name: str, kwargs: dict[str, Any], label: str = "model_kwargs") -> ModelEntry:
    """Fails fast, before any data is loaded, on an unknown model or keyword argument, or a value of the wrong
    type (the default's) or out of ``ARGUMENT_RANGES``; ``label`` names the field in the error
    (``train.model_kwargs`` in a study spec, say). A None value checks the argument's name only."""
    entry = get_model_entry(name)
    allowed = entry.defaults()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"{label}: {unknown} not accepted by model {name!r}; "
                          f"allowed: {', '.join(allowed) or 'none'}")
    for argument, value in kwargs.items():
        if value is not None:
            _check_argument(f"{label}.{argument}", argument, value, allowed[argument])
    return entry


def _check_argument(label: str, argument: str, value: Any, default: Any) -> None:
    if isinstance(default, int) and not isinstance(default, bool):
        integer(label, value)
    elif isinstance(default, float):
        number(label, value)
    if argument in ARGUMENT_RANGES:
        low, high = ARGUMENT_RANGES[argument]
        exclusive = argument in EXCLUSIVE_HIGH
        if not low <= value <= high or (exclusive and value == high):
            interval = f"[{low}, {high}{')' if exclusive else ']'}"
            raise ConfigError(f"{label}: {value!r} is out of range; it must be in {interval}")


def check_fits(model: str, image_shape: tuple[int, ...] | None, dataset: str, label: str = "model") -> None:
    """A model built for one image shape refuses a dataset of another (None: not known before loading),
    naming the models that fit."""
    entry = get_model_entry(model)
    if image_shape is not None and entry.input_shape != tuple(image_shape):
        fitting = [name for name in list_models() if get_model_entry(name).input_shape == tuple(image_shape)]
        raise ConfigError(f"{label}: {model!r} takes images of shape {entry.input_shape} (C, H, W) but dataset "
                          f"{dataset!r} has {tuple(image_shape)}; models for it: {', '.join(fitting) or 'none'}")


def check_config(config: Any) -> None:
    """A run config's model, its arguments and its fit with the dataset, before any data loads."""
    from .data import get_dataset_entry

    check_model_kwargs(config.model, config.model_kwargs)
    check_fits(config.model, get_dataset_entry(config.dataset).image_shape, config.dataset)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    return check_model_kwargs(name, kwargs).factory(**kwargs)


def _dropout(p: float) -> nn.Module:
    """Dropout, or nothing at all when p == 0: an identity op still costs time on small CPU models."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


@register_model(input_shape=(1, 28, 28))
def mnist_mlp(hidden_size: int = 128, dropout: float = 0.0, num_classes: int = 10) -> nn.Module:
    """MLP 784-hidden-10 with ReLU, as in the seed tutorial."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, hidden_size),
        nn.ReLU(),
        _dropout(dropout),
        nn.Linear(hidden_size, num_classes),
    )


class LeNet(nn.Module):
    """The classic CIFAR-10 tutorial LeNet: conv 3-6 5x5, pool, conv 6-16 5x5, pool, fc 400-120-84-10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model(input_shape=(3, 32, 32))
def cifar_lenet(num_classes: int = 10) -> nn.Module:
    """The classic CIFAR-10 tutorial LeNet (about 62k parameters)."""
    return LeNet(num_classes)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))


@register_model(input_shape=(3, 32, 32))
def cifar_cnn(hidden_size: int = 64, dropout: float = 0.0, num_classes: int = 10) -> nn.Module:
    """CNN conv 3-32-32-64 5x5 (pad 2, ReLU, 2x2 max-pool each), then linear 1024-hidden-10."""
    return nn.Sequential(
        _conv_block(3, 32),
        _conv_block(32, 32),
        _conv_block(32, 64),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, hidden_size),
        nn.ReLU(),
        _dropout(dropout),
        nn.Linear(hidden_size, num_classes),
    )
