"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020): normalised averaging when sites take different numbers of steps.

A site that takes more local steps moves further; FedAvg's mean then leans toward the objectives
of the busiest sites. FedNova divides each delta by the site's effective step count a_k before
averaging and rescales by the federation's mean one:

    delta = tau_eff * sum_k p_k delta_k / a_k,    tau_eff = sum_k p_k a_k,    p_k = n_k / n

a_k = tau_k for plain SGD (tau_k: the site's steps this round, its `local_steps` metric) and
a_k = [tau_k - rho (1 - rho^tau_k) / (1 - rho)] / (1 - rho) for SGD with momentum rho (the paper's
||a_k||_1; fedmi keeps momentum across rounds, so with momentum this is the paper's approximation).
With equal tau_k, delta is FedAvg's weighted mean exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.errors import FedmiError, check_number
from fedmi.server.base import STEPS, Reducer, site_metric
from fedmi.server.reducers import RunningSum


def effective_steps(steps: int, momentum: float) -> float:
    """||a_k||_1 of `steps` SGD steps with momentum rho (steps itself for rho = 0)."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)


@STEPS.register()
@dataclass
class FedNova(Reducer):
    """Normalised averaging of the sites' deltas by their local steps (streaming, O(model)).

    Args:
      momentum: the sites' local SGD momentum rho (0: plain SGD).
    Example: ``"fednova | server_sgd(lr=1.0)"``.
    """

    name: ClassVar[str] = "fednova"
    momentum: float = 0.0

    def __post_init__(self) -> None:
        check_number("fednova momentum", self.momentum, 0, 1, high_open=True)

    def start(self, like: P.ParamsT) -> dict:
        return {"sum": RunningSum(like), "examples": 0.0, "tau": 0.0}

    def fold(self, acc: dict, update: Update) -> dict:
        steps = site_metric(update, "local_steps", "fednova aggregation", "how many local steps it took")
        if steps < 1:
            raise FedmiError(f"fednova aggregation: the update from site {update.site} took {steps:g} local steps")
        a = effective_steps(int(steps), self.momentum)
        n = float(update.num_examples)
        acc["sum"].add(n / a, update.delta)  # sum_k n_k delta_k / a_k
        acc["examples"] += n
        acc["tau"] += n * a
        return acc

    def finish(self, acc: dict, like: P.ParamsT) -> P.Params:
        running: RunningSum = acc["sum"]
        # RunningSum.mean divides by sum_k n_k / a_k; FedNova wants tau_eff / n instead.
        scale = running.weight * (acc["tau"] / acc["examples"]) / acc["examples"]
        out = running.mean()
        for k, v in out.items():
            if v.is_floating_point():
                v.mul_(scale)
        return out
