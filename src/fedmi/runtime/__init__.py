"""Runtimes: how a round's local training reaches the sites. Algorithms never know which one runs them.

- sequential: every site in this process, one after another, on one reused model;
- vectorised: many sites' copies of the model trained at once (torch.func); falls back to
  sequential, with a notice, for a model or trainer it cannot batch;
- processes: sites spread over worker processes sharing the data read-only (heavy models);
- auto: vectorised for models with a `stacked_forward` (batched matrix products: logistic
  regression, MLP), sequential otherwise: on the CPU a convolution batched over sites (what vmap
  makes of it) is slower than one site's convolution after another, because the work is
  arithmetic, not per-call overhead (benchmarks/RESULTS.md, W3). `vectorised` forces it.
"""

from __future__ import annotations

import logging
from typing import Sequence

from torch import nn

from fedmi.core.types import SiteData
from fedmi.errors import FedmiError
from fedmi.runtime.base import Runtime
from fedmi.runtime.inprocess import InProcessRuntime
from fedmi.runtime.vectorised import VectorisedRuntime

RUNTIMES = ("auto", "sequential", "vectorised", "processes")
log = logging.getLogger("fedmi")


def make_runtime(kind: str, model: nn.Module, sites: Sequence[SiteData], workers: int | None = None) -> Runtime:
    """A runtime by name (see the module's docstring for what "auto" picks)."""
    if kind == "auto" and getattr(model, "stacked_forward", None) is None:
        log.info("runtime auto: %s has no stacked_forward; its sites train one after another",
                 type(model).__name__)
        kind = "sequential"
    if kind == "sequential":
        return InProcessRuntime(model, sites)
    if kind in ("auto", "vectorised"):
        return VectorisedRuntime(model, sites)
    if kind == "processes":
        from fedmi.runtime.process_pool import ProcessPoolRuntime

        return ProcessPoolRuntime(model, sites, workers=workers)
    raise FedmiError(f"unknown runtime '{kind}'; choose one of {', '.join(RUNTIMES)}")


__all__ = ["RUNTIMES", "InProcessRuntime", "Runtime", "VectorisedRuntime", "make_runtime"]
