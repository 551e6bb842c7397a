"""A tiny name -> factory registry shared by backbones, heads and policies.

Pluggable parts register under a stable name so the CLI, Optuna and bundles can build them
from a string without an ``if name == ...`` chain.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (usually classes) of one kind of part."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``factory`` under ``name`` (names are unique)."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items and self._items[name] is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered")  # a programming error
            self._items[name] = factory
            try:
                setattr(factory, "registry_name", name)
            except (AttributeError, TypeError):
                pass
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; a clear error listing valid names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **params: Any) -> T:
        """Build the part registered as ``name`` with ``params``."""
        return self.get(name)(**params)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
