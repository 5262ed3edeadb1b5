"""Streaming reducers: the sample-weighted mean (FedAvg) and the plain mean of the sites' deltas.

Each update is folded into a running sum as it arrives and dropped, so a round holds one
accumulator and one update whatever the number of sites (O(model) server memory).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.server.base import STEPS, Reducer


class RunningSum:
    """sum_k w_k * delta_k and sum_k w_k, folded in place: one model's memory.

    Floating tensors accumulate in their own dtype; integer ones (batch norm's step counter)
    in float64, rounded back at the end.
    """

    def __init__(self, like: P.ParamsT):
        self.like = like
        self.total = OrderedDict(
            (k, torch.zeros_like(v, dtype=v.dtype if v.is_floating_point() else torch.float64))
            for k, v in like.items())
        self.weight = 0.0

    def add(self, weight: float, delta: P.ParamsT) -> "RunningSum":
        for k, v in self.total.items():
            v.add_(delta[k], alpha=weight)
        self.weight += weight
        return self

    def mean(self) -> P.Params:
        if self.weight <= 0:
            raise ValueError("mean of no updates")
        for k, v in self.total.items():
            v.div_(self.weight)
            if v.dtype != self.like[k].dtype:
                self.total[k] = v.round().to(self.like[k].dtype)
        return self.total


@STEPS.register()
@dataclass
class WeightedMean(Reducer):
    """FedAvg's aggregate: delta = sum_k (n_k / n) delta_k, n = sum_k n_k (McMahan et al. 2017)."""

    name: ClassVar[str] = "weighted_mean"

    def start(self, like: P.ParamsT) -> RunningSum:
        return RunningSum(like)

    def fold(self, acc: RunningSum, update: Update) -> RunningSum:
        return acc.add(float(update.num_examples), update.delta)

    def finish(self, acc: RunningSum, like: P.ParamsT) -> P.Params:
        return acc.mean()


@STEPS.register()
@dataclass
class Mean(WeightedMean):
    """Unweighted mean of the sites' deltas: every site counts the same."""

    name: ClassVar[str] = "mean"

    def fold(self, acc: RunningSum, update: Update) -> RunningSum:
        return acc.add(1.0, update.delta)
