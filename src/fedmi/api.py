"""fedmi's Python API, for notebooks and scripts: `import fedmi`, then `fedmi.run(...)`.

    import fedmi

    fed = fedmi.load_federation("heart-disease")                  # or Federation.from_arrays / from_frame
    result = fedmi.run(fed, model="logistic", method="fedprox", mu=0.01, rounds=20)
    result.final_table()                                           # each site's test metrics (pandas)

Everything can be an object instead of a name: `model` any `torch.nn.Module` mapping a batch to
the task's outputs, `method` a `LocalMethod`, `aggregator` a pipeline (`fedmi.server.median()`),
`runtime` "auto", "sequential", "vectorised" or "processes".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.device import resolve_device
from fedmi.core.local import LocalMethod
from fedmi.core.runner import Runner, Selector
from fedmi.data.federation import Federation
from fedmi.errors import FedmiError
from fedmi.experiments.defaults import model_defaults, trainer_defaults
from fedmi.models import build_model
from fedmi.runtime import make_runtime
from fedmi.server import AggregationPipeline, Step, make_aggregator, make_selector


@dataclass
class Result:
    """What `run` returns.

    Attributes:
      params: the final global parameters (and buffers).
      history: one record per round: "round", "sites", "rejected", "train_loss", "seconds" and, on
        evaluated rounds, "test": {site: {metric: value}}.
      model: the model with the final parameters loaded, on the CPU (whichever device trained it).
      federation: the federation it ran on.
    """

    params: P.Params
    history: list[dict]
    model: nn.Module
    federation: Federation
    method: LocalMethod = field(repr=False, default=None)

    @property
    def final(self) -> dict[str, dict]:
        """Each site's test metrics after the last round."""
        return self.history[-1].get("test", {})

    def final_table(self) -> pd.DataFrame:
        """The final metrics as a table: one row per site, one column per metric (n/a as NaN)."""
        return pd.DataFrame.from_dict(self.final, orient="index").astype(float)

    def curves(self) -> pd.DataFrame:
        """Per evaluated round and site: the training loss of the round and each test metric."""
        rows = [{"round": r["round"], "site": site, "train_loss": r.get("train_loss"), **metrics}
                for r in self.history for site, metrics in r.get("test", {}).items()]
        return pd.DataFrame(rows)


def _model(model: str | nn.Module | None, fed: Federation, seed: int, options: dict[str, Any] | None) -> nn.Module:
    if model is None or isinstance(model, str):
        model, options = model_defaults(fed, model, options)
    if isinstance(model, nn.Module):
        if options:
            raise FedmiError("model_options go to a model given by name; the torch.nn.Module is already built")
        return copy.deepcopy(model)  # the runtime loads weights into it; the caller's stays as it was
    if isinstance(model, str):
        return build_model(model, fed.input_shape, seed, fed.task.num_outputs, options)
    raise FedmiError(f"model must be a model name or a torch.nn.Module, got {type(model).__name__}")


def _method(method: str | LocalMethod, options: dict[str, Any], fed: Federation | None = None) -> LocalMethod:
    if isinstance(method, LocalMethod):
        if options:
            raise FedmiError(f"method options {sorted(options)} go to a method given by name; "
                             f"{type(method).__name__} is already built")
        return method
    if isinstance(method, str):
        return make_method(method, **(options if fed is None else trainer_defaults(fed, method, options)))
    raise FedmiError(f"method must be a method name or a LocalMethod, got {type(method).__name__}")


def _aggregator(aggregator: str | Step | AggregationPipeline | None, server_lr: float,
                method: LocalMethod) -> AggregationPipeline:
    if isinstance(aggregator, AggregationPipeline):
        aggregator.parts()  # its shape is checked now, not in round 1
        return aggregator
    if isinstance(aggregator, Step):
        return AggregationPipeline([aggregator])
    if aggregator is None or isinstance(aggregator, str):
        return make_aggregator(aggregator, server_lr, method)
    raise FedmiError(f"aggregator must be a pipeline text, a step or a pipeline, got {type(aggregator).__name__}")


def run(federation: Federation, model: str | nn.Module | None = None, method: str | LocalMethod = "fedavg",
        model_options: dict[str, Any] | None = None,
        aggregator: str | Step | AggregationPipeline | None = None, runtime: str = "auto", rounds: int = 20,
        seed: int = 0, test_fraction: float = 0.2, fraction: float = 1.0, selector: Selector | None = None,
        server_lr: float = 1.0, evaluate_every: int = 1, workers: int | None = None, device: str = "cpu",
        on_round: Callable[[int], None] | None = None, **method_options: Any) -> Result:
    """Train one model across the federation's sites and evaluate it at each site.

    Args:
      federation: the sites (`load_federation`, `Federation.from_arrays`, `Federation.from_frame`).
      model: a registered model name ("logistic", "cnn", "resnet18", "unet", ...) or any torch.nn.Module
        (a MONAI network, your own); None: the recipe for the federation's kind of data
        (`fedmi.experiments.defaults`: logistic for tables, ResNet-18 at a quarter width for images,
        U-Net for masks), as `fedmi run` and `fedmi table2` choose.
      model_options: a named model's own arguments (``{"channels": [8, 16, 32], "strides": [2, 2]}``).
      method: a local method name ("fedavg", "fedprox", "fedsgd", ...) or a `LocalMethod` object.
      aggregator: a pipeline text ("median", "weighted_mean | server_sgd(lr=0.5)"), a step or a
        pipeline; default: the method's own reducer (SCAFFOLD's) or the sample-weighted mean, and a
        server step of `server_lr`.
      runtime: "auto", "sequential", "vectorised" or "processes".
      rounds, seed: the run's length and seed (splits, initial weights, batches, selection).
      test_fraction: each site's held-out share (a dataset's fixed split, if it has one, wins).
      fraction / selector: the share of sites drawn each round, or a `Selector` object.
      evaluate_every: evaluate every k rounds (0: only after the last).
      workers: worker processes for runtime "processes".
      device: where the sites compute: "cpu", "cuda", "cuda:N", "mps" or "auto" (CUDA if present;
        off the CPU, runtime "sequential" or "auto").
      on_round: called with the number of completed rounds after each round.
      **method_options: options of a method given by name (lr, batch_size, local_steps, mu, ...); the
        optimiser options not given are the data's recipe's (Adam at 0.001, one pass a round, for images).
    Returns:
      A `Result`: final parameters, per-round history, the trained model, final metrics per site.
    """
    if not isinstance(federation, Federation):
        raise FedmiError(f"federation must be a fedmi Federation, got {type(federation).__name__}")
    sites = [s.to(resolve_device(device)) for s in federation.split(seed, test_fraction)]
    net = _model(model, federation, seed, model_options)
    local = _method(method, method_options, federation)
    pipeline = _aggregator(aggregator, server_lr, local)
    init = P.clone(net.state_dict())
    backend = make_runtime(runtime, net, sites, federation.task, workers)
    try:
        result = Runner(backend, local, pipeline, rounds=rounds, seed=seed,
                        selector=selector or make_selector(fraction), evaluate_every=evaluate_every,
                        tags={"method": getattr(local, "name", type(local).__name__)},
                        loss_bound=federation.task.loss_bound).run(init, on_round)
    finally:
        backend.close()
    with torch.no_grad():
        net.cpu().load_state_dict(result.params)
    net.eval()
    return Result(result.params, result.history, net, federation, local)
