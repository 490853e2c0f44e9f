"""One registry for everything registered by name (models, datasets): timm's pattern, a decorator that adds an
entry and a lookup that names every registered choice when a name is unknown."""

from __future__ import annotations

from typing import Generic, TypeVar

from .validators import ConfigError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries by name; ``kind`` ("model", "dataset") names them in errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> None:
        self._entries[name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(f"{self.kind}: unknown {self.kind} {name!r}; registered {self.kind}s: "
                              f"{', '.join(self.names())}")
        return self._entries[name]
