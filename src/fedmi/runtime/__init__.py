"""Runtimes: backends that run a round's local methods at the sites. Methods never know which.

- sequential: every site in this process, one after another;
- vectorised: many sites' copies of the model at once (stacked tensors, vmap); a method or model
  it cannot batch runs sequentially, with a one-line notice;
- processes: sites spread over worker processes sharing the data read-only (heavy models);
- auto: sequential for sites on an accelerator; else vectorised for models with `stacked_forward`,
  processes for the others where forking is safe, else sequential (`choose_runtime`).
Flower's runtimes (deployment and simulation) are `fedmi.runtime.flower.grid` with the apps in
`fedmi.apps`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Sequence

from torch import nn

from fedmi.core.device import CPU
from fedmi.core.registry import import_submodules
from fedmi.core.runtime import RUNTIMES, Runtime
from fedmi.core.tasks import Task
from fedmi.core.types import SiteData
from fedmi.errors import FedmiError
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.runtime.vectorised import VectorisedRuntime

log = logging.getLogger("fedmi")
import_submodules(__name__)  # each backend registers itself



def choose_runtime(model: nn.Module) -> str:
    """What `auto` runs.

    - vectorised for models that define `stacked_forward` (batched matrix products: logistic
      regression, MLP): their time is per-call overhead, which batching across sites removes;
    - processes for the others (convolutions: arithmetic, which a batch over sites does not
      reduce on the CPU, but more cores do), when forking is safe: on Linux, with more than one
      core, from a process that runs a single Python thread (the fedmi command, a script);
    - sequential otherwise (a notebook kernel or a threaded server runs several threads, and a
      fork copies their locks in whatever state they are).
    """
    if getattr(model, "stacked_forward", None) is not None:
        return "vectorised"
    if sys.platform.startswith("linux") and (os.cpu_count() or 1) > 1 and not _other_threads():
        return "processes"
    return "sequential"


def _other_threads() -> list[threading.Thread]:
    """The threads a fork would copy mid-flight, besides this one. multiprocessing's own helper
    (the thread that hands shared-memory handles to workers, started by a process pool) is left
    out: multiprocessing resets it in a forked child."""
    return [t for t in threading.enumerate() if t is not threading.current_thread() and
            not getattr(getattr(t, "_target", None), "__module__", "").startswith("multiprocessing.")]


def make_runtime(kind: str, model: nn.Module, sites: Sequence[SiteData], task: Task | None = None,
                 workers: int | None = None) -> Runtime:
    """A runtime by registered name ("sequential", "vectorised", "processes", ...) or "auto".

    Args:
      kind: the runtime's name, or "auto" (`choose_runtime`).
      model: the model's code (its weights are replaced by each round's parameters).
      sites: the sites' data, in the order that keys their random streams. Sites whose data is on
        an accelerator (`SiteData.to`) run on the sequential runtime, the one that computes there.
      task: loss, scores and metrics of the labels (default: binary).
      workers: worker processes, for runtimes that have them.
    """
    device = sites[0].x_train.device if sites else CPU
    if kind == "auto":
        kind = choose_runtime(model) if device == CPU else "sequential"
        log.info("runtime auto: %s for %s", kind, type(model).__name__)
    if kind not in RUNTIMES:
        raise FedmiError(f"unknown runtime '{kind}'; choose one of {', '.join(runtime_names())}")
    if device != CPU and kind != "sequential":
        raise FedmiError(f"runtime '{kind}' runs its sites on the CPU; the sites' data is on {device}: "
                         "use runtime sequential (or auto) there")
    return RUNTIMES.get(kind)(model, sites, task, workers)


def runtime_names() -> tuple[str, ...]:
    """Every name `make_runtime` accepts."""
    return ("auto", *RUNTIMES)


__all__ = ["RUNTIMES", "Runtime", "SequentialRuntime", "VectorisedRuntime", "choose_runtime", "make_runtime",
           "runtime_names"]
