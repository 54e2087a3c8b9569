"""Name -> object registries, so stages never branch on names."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    def lazy(self, name: str, module: str) -> None:
        """Declare that importing `module` registers `name`: it is imported on first use, so a
        process that never uses a heavy entry (one needing torch, say) never pays for its import."""
        self._lazy[name] = module

    def module_of(self, name: str) -> str | None:
        """The module a lazily declared name is registered by (None: not declared lazily)."""
        return self._lazy.get(name)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, key: str | None = None) -> T:
        if name not in self._items and isinstance(name, str) and name in self._lazy:
            import importlib

            importlib.import_module(self._lazy[name])
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(key or self.kind, name, f"one of {self.names()}") from None

    def check(self, name: str, key: str | None = None) -> None:
        """Raise the error `get` would for an unknown name, without importing a lazy entry's module."""
        if name not in self:
            raise ConfigError(key or self.kind, name, f"one of {self.names()}")

    def names(self) -> list[str]:
        return sorted({*self._items, *self._lazy})

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items or name in self._lazy
        except TypeError:  # an unhashable value from a config (a list, a mapping) names nothing
            return False
