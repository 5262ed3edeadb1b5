"""fedmi: federated learning for medical image analysis.

    import fedmi
    fed = fedmi.load_federation("heart-disease")
    result = fedmi.run(fed, model="logistic", method="fedavg", rounds=20)

The names below load on first use, so `import fedmi` stays light (a deployed site process
imports only what it runs).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from fedmi.errors import FedmiError

__version__ = "0.1.0"

_LAZY = {
    "run": "fedmi.api", "Result": "fedmi.api",
    "Federation": "fedmi.data", "Site": "fedmi.data", "load_federation": "fedmi.data", "DATASETS": "fedmi.data",
    "LocalMethod": "fedmi.core.local", "LocalSchedule": "fedmi.core.batches", "METHODS": "fedmi.client",
    "make_method": "fedmi.client", "make_aggregator": "fedmi.server", "parse_pipeline": "fedmi.server",
    "make_task": "fedmi.core.tasks", "build_model": "fedmi.models", "MODELS": "fedmi.models",
    "make_runtime": "fedmi.runtime", "Augment": "fedmi.data.augment", "data_card": "fedmi.experiments.data_card",
    "write_html_report": "fedmi.experiments.html_report",
}
__all__ = ["FedmiError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in ("client", "server", "data", "models", "runtime", "core", "experiments"):
        return import_module(f"fedmi.{name}")
    raise AttributeError(f"module 'fedmi' has no attribute '{name}'")
