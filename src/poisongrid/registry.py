"""Name -> object registries, so stages never branch on names.

Plug-ins from outside the package register through a Python entry-point group per registry
(`poisongrid.datasets`, `.models`, `.attacks`, `.detectors`, `.remedies`): an installed
distribution declaring, say, `[project.entry-points."poisongrid.detectors"] my_loss =
"mylab.detectors:MyLoss"` makes `type: my_loss` valid in a config; the module is imported only
when a config first names it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Generic, TypeVar

from .errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group  # the entry-point group plug-ins from outside the package register under
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}
        self._plugins: dict[str, EntryPoint] | None = None

    def lazy(self, name: str, module: str) -> None:
        """Declare that importing `module` registers `name`: it is imported on first use, so a
        process that never uses a heavy entry (one needing torch, say) never pays for its import."""
        self._lazy[name] = module

    def module_of(self, name: str) -> str | None:
        """The module a lazily declared name is registered by (None: not declared lazily)."""
        return self._lazy.get(name)

    def plugins(self) -> dict[str, EntryPoint]:
        """Entry points of installed distributions in this registry's group (found once per
        process); a name the package itself defines is not overridden."""
        if self._plugins is None:
            self._plugins = {}
            if self.group:
                from importlib.metadata import entry_points

                for ep in entry_points(group=self.group):
                    if ep.name not in self._items and ep.name not in self._lazy:
                        self._plugins.setdefault(ep.name, ep)
        return self._plugins

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, key: str | None = None) -> T:
        if name not in self._items and isinstance(name, str):
            if name in self._lazy:
                import importlib

                importlib.import_module(self._lazy[name])
            elif name in self.plugins():
                self._load_plugin(name, key)
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(key or self.kind, name, f"one of {self.names()}{did_you_mean(name, self.names())}") from None

    def _load_plugin(self, name: str, key: str | None) -> None:
        ep = self.plugins()[name]
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in is the user's to fix: say which
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ConfigError(key or self.kind, name, f"a plug-in that imports: entry point '{ep.name} = {ep.value}' "
                              f"of group {self.group} failed ({type(e).__name__}: {first})") from None
        if name not in self._items:  # the module may have registered it itself
            self._items[name] = obj

    def check(self, name: str, key: str | None = None) -> None:
        """Raise the error `get` would for an unknown name, without importing a lazy entry's module."""
        if name not in self:
            raise ConfigError(key or self.kind, name, f"one of {self.names()}{did_you_mean(name, self.names())}")

    def names(self, plugins: bool = True) -> list[str]:
        return sorted({*self._items, *self._lazy, *(self.plugins() if plugins else ())})

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items or name in self._lazy or name in self.plugins()
        except TypeError:  # an unhashable value from a config (a list, a mapping) names nothing
            return False
