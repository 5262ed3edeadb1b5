"""Runtimes: backends that run a round's local methods at the sites. Methods never know which.

- sequential: every site in this process, one after another;
- vectorised: many sites' copies of the model at once (stacked tensors, vmap); a method or model
  it cannot batch runs sequentially, with a one-line notice;
- processes: sites spread over worker processes sharing the data read-only (heavy models);
- auto: see `choose_runtime`.
Flower's runtimes (deployment and simulation) are `fedmi.runtime.flower.grid` with the apps in
`fedmi.apps`.
"""

from __future__ import annotations

import logging
from typing import Sequence

from torch import nn

from fedmi.core.runtime import Runtime
from fedmi.core.tasks import Task
from fedmi.core.types import SiteData
from fedmi.errors import FedmiError
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.runtime.vectorised import VectorisedRuntime

log = logging.getLogger("fedmi")

RUNTIMES = ("auto", "sequential", "vectorised", "processes")


def choose_runtime(model: nn.Module) -> str:
    """What `auto` runs: vectorised for models that define `stacked_forward` (batched matrix
    products: logistic regression, MLP), sequential otherwise: on the CPU a convolution batched
    over sites costs what the sites' convolutions cost one by one (benchmarks/RESULTS.md, W3).
    `processes` is not chosen automatically: it forks, which not every host program tolerates."""
    return "vectorised" if getattr(model, "stacked_forward", None) is not None else "sequential"


def make_runtime(kind: str, model: nn.Module, sites: Sequence[SiteData], task: Task | None = None,
                 workers: int | None = None) -> Runtime:
    """A runtime by name: "auto", "sequential", "vectorised" or "processes"."""
    if kind == "auto":
        kind = choose_runtime(model)
        log.info("runtime auto: %s for %s", kind, type(model).__name__)
    if kind == "sequential":
        return SequentialRuntime(model, sites, task)
    if kind == "vectorised":
        return VectorisedRuntime(model, sites, task)
    if kind == "processes":
        from fedmi.runtime.process_pool import ProcessPoolRuntime

        return ProcessPoolRuntime(model, sites, task, workers=workers)
    raise FedmiError(f"unknown runtime '{kind}'; choose one of {', '.join(RUNTIMES)}")


__all__ = ["RUNTIMES", "Runtime", "SequentialRuntime", "VectorisedRuntime", "choose_runtime", "make_runtime"]
