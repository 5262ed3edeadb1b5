"""Client end (survey §IV): local methods, one file each, and site-side evaluation.

Every module here registers its methods in `METHODS` when imported; this package imports them
all, so a new method is one new file.
"""

from __future__ import annotations

from typing import Any

from fedmi.core.local import METHODS, LocalMethod
from fedmi.core.registry import import_submodules
from fedmi.errors import FedmiError

import_submodules(__name__)

from fedmi.client.fedsgd import FedSGD  # noqa: E402  (re-exported: the built-in methods by class)
from fedmi.client.sgd import FedAvg, FedProx  # noqa: E402


def make_method(name: str, **options: Any) -> LocalMethod:
    """A local method by registry name, with its defaults overridden by `options`.

    Example: ``make_method("fedprox", mu=0.01, local_steps=20)``.
    """
    cls = METHODS.get(name)
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
