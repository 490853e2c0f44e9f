"""Checks for values a user gives (flags, spec and benchmark fields): each returns the value or raises a
``ConfigError`` in the one error format, ``<field>: <what is wrong>; <what is allowed>``."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence


class ConfigError(ValueError):
    """A bad setting. The message names the field and the allowed values."""


def choice(label: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise ConfigError(f"{label}: {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
    return value


def choices(label: str, values: Sequence[Any], allowed: Sequence[Any]) -> list:
    """Every one of ``values`` in ``allowed`` (a comma-separated option, say)."""
    return [choice(label, value, allowed) for value in values]


def table(label: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{label}: expected a table, got {value!r}")
    return value


def check_keys(label: str, values: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{label}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")


def string(label: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or not (value or allow_empty):
        raise ConfigError(f"{label}: expected a non-empty string, got {value!r}")
    return value


def boolean(label: str, value: Any) -> bool:
    """``true`` or ``false`` (TOML's spelling), not a number or a string."""
    if not isinstance(value, bool):
        raise ConfigError(f"{label}: {value!r} is not allowed; choose one of: false, true")
    return value


def integer(label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label}: expected an integer, got {value!r}")
    return value


def number(label: str, value: Any) -> float:
    """A finite int or float (not a bool, NaN or infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{label}: expected a finite number, got {value!r}")
    return float(value)


def at_least(label: str, value: Any, low: float, inclusive: bool = True) -> Any:
    """A number >= ``low`` (> ``low`` when not ``inclusive``)."""
    number(label, value)
    if value < low or (not inclusive and value == low):
        bound = f">= {low}" if inclusive else f"> {low}"
        raise ConfigError(f"{label}: {value!r} is out of range; it must be {bound}")
    return value


def positive_int(label: str, value: Any, minimum: int = 1) -> int:
    return at_least(label, integer(label, value), minimum)


def positive_number(label: str, value: Any) -> float:
    return at_least(label, value, 0, inclusive=False)


def optional(value: Any, check: Callable[[Any], Any]) -> Any:
    return None if value is None else check(value)
