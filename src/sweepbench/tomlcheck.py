"""Reading TOML files (study specs, benchmark files). Their values are checked by ``validators``, re-exported
here for the spec and benchmark parsers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .validators import (ConfigError, boolean, check_keys, choice, integer, number, optional, positive_int,
                         positive_number, string, table)

__all__ = ["boolean", "check_keys", "choice", "integer", "number", "optional", "positive_int", "positive_number",
           "read_toml", "string", "table"]

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def read_toml(path: str | Path, kind: str) -> tuple[dict[str, Any], str]:
    """The parsed document and its text; ``kind`` names the file in errors ("study spec", "benchmark file")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the {kind} as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {kind}: {exc.strerror}") from exc
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
