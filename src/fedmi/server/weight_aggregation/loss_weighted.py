"""Loss-weighted aggregation: a site counts less the higher its training loss (Li et al., survey
ref. [76], federated COVID-19 detection from chest images)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.errors import check_number
from fedmi.server.base import STEPS, Reducer, site_metric
from fedmi.server.reducers import RunningSum


class _ShiftedSum:
    """RunningSum of n_k exp(-(L_k - s) / T) delta_k with s the lowest loss folded so far.

    Shifting by the running minimum keeps every factor in (0, 1] (no overflow, and the best site's
    factor is exactly 1); when a lower loss arrives the sum so far is rescaled by exp(-(s - L) / T).
    """

    def __init__(self, like: P.ParamsT):
        self.sum, self.shift = RunningSum(like), math.inf

    def add(self, n: float, loss: float, temperature: float, delta: P.ParamsT) -> "_ShiftedSum":
        if loss < self.shift:
            if self.sum.weight > 0:
                factor = math.exp(-(self.shift - loss) / temperature)
                for v in self.sum.total.values():
                    v.mul_(factor)
                self.sum.weight *= factor
            self.shift = loss
        self.sum.add(n * math.exp(-(loss - self.shift) / temperature), delta)
        return self


@STEPS.register()
@dataclass
class LossWeighted(Reducer):
    """delta = sum_k a_k delta_k with a_k = n_k exp(-L_k / T) / sum_j n_j exp(-L_j / T).

    The idea of Li et al. (survey ref. [76]): a site whose local training ends at a higher loss
    (noisier or harder data) gets a smaller weight. The exact form is fedmi's: the sample count
    n_k times a softmax of -L_k / T, L_k the update's metrics["train_loss"] (the mean training
    loss over the round). Equal losses give FedAvg's weighted mean exactly; T -> infinity tends to
    it; T -> 0 gives all the weight to the lowest-loss site(s).

    Streaming: each update folds into one O(model) sum, shifted by the lowest loss so far (see
    `_ShiftedSum`), so the result does not depend on the order beyond float rounding.

    Args:
      temperature: T > 0, in the units of the loss (default 1.0).
    """

    name: ClassVar[str] = "loss_weighted"

    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_number("loss_weighted temperature", self.temperature, 0, low_open=True)

    def start(self, like: P.ParamsT) -> _ShiftedSum:
        return _ShiftedSum(like)

    def fold(self, acc: _ShiftedSum, update: Update) -> _ShiftedSum:
        loss = site_metric(update, "train_loss", self.name, "its mean training loss this round")
        return acc.add(float(update.num_examples), loss, self.temperature, update.delta)

    def finish(self, acc: _ShiftedSum, like: P.ParamsT) -> P.Params:
        return acc.sum.mean()
