"""Name registries: how a YAML file or a script reaches a class by a short name.

A base class owns one :class:`Registry`; each subclass registers itself with
``class Mine(Base, name="mine")``. Lookups of unknown names fail with the list of known ones.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from fedgen.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from short names to the classes of one kind (mechanisms, generators, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str, cls: type[T]) -> None:
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(
                f"{self.kind} name {name!r} is already taken by {self._classes[name].__qualname__}; "
                f"choose another name for {cls.__qualname__}"
            )
        self._classes[name] = cls

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(
                self.kind,
                f"unknown {self.kind} {name!r}",
                f"use one of {sorted(self._classes)} or register a subclass with name={name!r}",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes


class Registered:
    """Mixin for base classes with a ``registry``: ``class Mine(Base, name="mine")`` registers ``Mine``."""

    registry: Registry
    name: str | None = None

    def __init_subclass__(cls, name: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.registry.register(name, cls)
            cls.name = name
