"""Name → factory registries (in the spirit of timm's model registry) with helpful errors."""
from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """A name no registry entry has (a strategy, backbone or dataset); the message lists the available ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, choices) -> str:
    """A short ' Did you mean 'x'?' hint, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A case-insensitive mapping of names to factories; unknown names raise with a suggestion."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(o: T) -> T:
            key = name.lower()
            if key in self._items:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._items[key] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise UnknownNameError(
                f"Unknown {self.kind} '{name}'.{did_you_mean(key, self._items)} "
                f"Available: {', '.join(sorted(self._items))}."
            )
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
