"""Reading TOML files (study specs, benchmark files) and checking their values: each check returns the value or
raises a ``ConfigError`` that names the field and what is allowed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def read_toml(path: str | Path, kind: str) -> tuple[dict[str, Any], str]:
    """The parsed document and its text; ``kind`` names the file in errors ("study spec", "benchmark file")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {path} not found")
    text = path.read_text()
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def table(label: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{label}: expected a table, got {value!r}")
    return value


def check_keys(label: str, table: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{label}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")


def choice(label: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{label}: {value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return value


def string(label: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or not (value or allow_empty):
        raise ConfigError(f"{label}: expected a non-empty string, got {value!r}")
    return value


def integer(label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label}: expected an integer, got {value!r}")
    return value


def number(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{label}: expected a number, got {value!r}")
    return float(value)


def positive_int(label: str, value: Any, minimum: int = 1) -> int:
    if integer(label, value) < minimum:
        raise ConfigError(f"{label}: {value!r} is out of range; it must be >= {minimum}")
    return value


def positive_number(label: str, value: Any) -> float:
    if number(label, value) <= 0:
        raise ConfigError(f"{label}: {value!r} is out of range; it must be > 0")
    return value


def optional(value: Any, check: Callable[[Any], Any]) -> Any:
    return None if value is None else check(value)
