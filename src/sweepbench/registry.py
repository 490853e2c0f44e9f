"""One registry for everything registered by name (models, datasets): timm's pattern, a decorator that adds an
entry and a lookup that names every registered choice when a name is unknown."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .validators import ConfigError

Entry = TypeVar("Entry")
Function = TypeVar("Function", bound=Callable)


class Registry(Generic[Entry]):
    """Entries by name; ``kind`` ("model", "dataset") names them in errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> None:
        self._entries[name] = entry

    def decorator(self, make_entry: Callable[[Function], Entry]) -> Callable[[Function], Function]:
        """A decorator that registers a function under its name, as the entry ``make_entry`` makes of it."""

        def register(function: Function) -> Function:
            self.add(function.__name__, make_entry(function))
            return function

        return register

    def names(self) -> list[str]:
        return sorted(self._entries)

    def in_order(self) -> list[str]:
        """The names in the order they were registered."""
        return list(self._entries)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(f"{self.kind}: unknown {self.kind} {name!r}; registered {self.kind}s: "
                              f"{', '.join(self.names())}")
        return self._entries[name]
