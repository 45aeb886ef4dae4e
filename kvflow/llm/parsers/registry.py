"""A registry of parser classes by name, with aliases and a helpful error for unknown names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to classes of one kind of parser."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str, *aliases: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make the class available under `name` and each alias."""

        def add(cls: type[T]) -> type[T]:
            for key in (name, *aliases):
                if key in self._classes and self._classes[key] is not cls:
                    raise ValueError(f"{self.kind} {key!r} is already registered")
                self._classes[key] = cls
            return cls

        return add

    def get(self, name: str) -> type[T]:
        """The class registered as `name`; ValueError naming the known ones otherwise."""
        cls = self._classes.get(name)
        if cls is None:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)
