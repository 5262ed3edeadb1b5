"""Registries: name -> class for each extension point. An entry registers itself where it is
defined (`@METHODS.register`), so adding a method, step, dataset, model, task or runtime is one
new file in its family's folder; the family's package imports every module in it."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

from fedmi.errors import FedmiError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind of extension point (`what`, e.g. "trainer") mapped to their builders.

    Example:
        MODELS = Registry("model")

        @MODELS.register("mlp")
        def build_mlp(input_shape, num_outputs): ...

        MODELS.get("mlp")   # the function; an unknown name is a FedmiError listing the known ones
    """

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` (default: its `name` attribute)."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "name", None)
            if not key:
                raise TypeError(f"{obj!r} has no name to register it under")
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.what} '{key}' is registered twice")
            self._entries[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise FedmiError(f"unknown {self.what} '{name}'; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)


def import_submodules(package: str) -> None:
    """Import every module of `package` so that each registers what it defines."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")
