"""Client end (survey §IV): local methods, one file each, and site-side evaluation.

Every module here registers its methods in `METHODS` when imported; this package imports them
all, so a new method is one new file.
"""

from __future__ import annotations

import inspect
from typing import Any

from fedmi.core.local import METHODS, LocalMethod
from fedmi.core.registry import import_submodules
from fedmi.core.schema import closest
from fedmi.errors import FedmiError

import_submodules(__name__)

from fedmi.client.fedsgd import FedSGD  # noqa: E402  (re-exported: the built-in methods by class)
from fedmi.client.sgd import FedAvg, FedProx  # noqa: E402


def _option_names(cls: type) -> list[str]:
    """The keyword options a method's constructor takes, through the **kwargs it passes to its bases."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def make_method(name: str, **options: Any) -> LocalMethod:
    """A local method by registry name, with its defaults overridden by `options`.

    Example: ``make_method("fedprox", mu=0.01, local_steps=20)``.
    """
    cls = METHODS.get(name)
    accepted = _option_names(cls)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise FedmiError(f"trainer {name} has no option '{unknown[0]}'{closest(unknown[0], accepted)}; "
                         f"its options: {', '.join(accepted) or 'none'}")
    try:
        return cls(**options)
    except TypeError as e:
        raise FedmiError(f"trainer {name}: {e}") from None


def method_from_spec(spec: object) -> LocalMethod:
    """The method `LocalMethod.spec()` described (sent to a site in another process); its checks run again."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("options"), dict):
        raise FedmiError(f"not a trainer description: {spec!r:.200}")
    return make_method(spec["name"], **spec["options"])


__all__ = ["METHODS", "FedAvg", "FedProx", "FedSGD", "LocalMethod", "make_method", "method_from_spec"]
