"""SCAFFOLD's server side (Karimireddy et al., ICML 2020, Algorithm 1).

    x <- x + eta_g * mean_k delta_k            (the pipeline's server optimiser applies eta_g)
    c <- c + (|S|/N) mean_k Delta c_k          (N: sites in the federation, S: this round's)

The paper's means over S are uniform; `weighted=True` (the default) weighs both by the sites'
sample counts, as FedAvg does, so that c estimates the gradient of the same sample-weighted
objective the deltas descend and SCAFFOLD differs from FedAvg only in the drift correction.
The server's c is this step's state and reaches the sites with the parameters (`broadcast`);
each site's c_k stays at the site (the `scaffold` trainer's site state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedmi.core import params as P
from fedmi.core.extras import SCAFFOLD_CONTROL_DELTA, SCAFFOLD_SERVER_CONTROL
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.server.base import STEPS, Reducer
from fedmi.server.reducers import RunningSum


@STEPS.register()
@dataclass
class Scaffold(Reducer):
    """The mean of the deltas, and the server control variate updated from the sites' Delta c_k.

    Args:
      weighted: weigh deltas by sample count (FedAvg's mean) rather than uniformly (the paper's).
    Example: ``"scaffold | server_sgd(lr=1.0)"`` with the `scaffold` trainer.
    """

    name: ClassVar[str] = "scaffold"
    weighted: bool = True

    def init(self, params: P.ParamsT) -> dict:
        return {"c": {}}  # filled from the first round's Delta c_k: only trained parameters have one

    def broadcast(self, state: Any) -> dict[str, torch.Tensor]:
        return {SCAFFOLD_SERVER_CONTROL + k: v for k, v in state["c"].items()}

    def start(self, like: P.ParamsT) -> dict:
        return {"deltas": RunningSum(like), "controls": {}, "count": 0}

    def fold(self, acc: dict, update: Update) -> dict:
        changes = {k[len(SCAFFOLD_CONTROL_DELTA):]: v for k, v in update.extras.items()
                   if k.startswith(SCAFFOLD_CONTROL_DELTA)}
        if not changes:
            raise FedmiError(f"scaffold aggregation: the update from site {update.site} carries no control "
                             "variate (train with the scaffold trainer)")
        weight = float(update.num_examples) if self.weighted else 1.0
        acc["deltas"].add(weight, update.delta)
        for k, v in changes.items():
            if k not in update.delta or v.shape != update.delta[k].shape:
                raise FedmiError(f"scaffold aggregation: site {update.site}'s control variate '{k}' does not match "
                                 "a parameter of the model")
            if not bool(torch.isfinite(v).all()):
                raise FedmiError(f"scaffold aggregation: site {update.site}'s control variate '{k}' is not finite")
            total = acc["controls"].get(k)
            acc["controls"][k] = v.double() * weight if total is None else total.add_(v, alpha=weight)
        acc["count"] += 1
        return acc

    def finish(self, acc: dict, like: P.ParamsT) -> P.Params:
        return acc["deltas"].mean()

    def finish_round(self, acc: dict, like: P.ParamsT, state: Any, round_info: RoundInfo) -> tuple[P.Params, Any]:
        share = acc["count"] / (round_info.num_sites or acc["count"])  # |S| / N
        weight = acc["deltas"].weight
        control = dict(state["c"])
        for k, total in acc["controls"].items():
            step = (total * (share / weight)).to(like[k].dtype)
            control[k] = step if k not in control else control[k] + step
        return acc["deltas"].mean(), {"c": control}
