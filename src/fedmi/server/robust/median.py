"""Coordinate-wise robust statistics (Yin et al., "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018): the median and the beta-trimmed mean of each coordinate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.errors import FedmiError, check_number
from fedmi.server.base import STEPS, Reducer
from fedmi.server.robust import blocks


@STEPS.register()
@dataclass
class CoordinateMedian(Reducer):
    """Coordinate-wise median of the deltas (Yin et al. 2018), robust to a minority of bad sites.

    delta[j] = median_k delta_k[j]; with an even number of sites, the mean of the two middle values.
    """

    name: ClassVar[str] = "median"
    needs_all_updates: ClassVar[bool] = True

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        out = P.zeros_like(like)
        lo, hi = (len(updates) - 1) // 2, len(updates) // 2
        for k, cols, block in blocks.column_blocks(updates, like):
            ordered = block.sort(dim=1).values
            out[k].view(-1)[cols] = (ordered[:, lo] + ordered[:, hi]) / 2
        return out


@STEPS.register()
@dataclass
class TrimmedMean(Reducer):
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018, Definition 2), robust to up to b bad sites.

    With K updates and b = floor(beta K): for each coordinate j, sort delta_1[j], ..., delta_K[j],
    drop the b largest and the b smallest, and average the K - 2b left,
    delta[j] = 1/(K - 2b) sum_{i=b+1}^{K-b} delta_(i)[j]. Sites' sizes are ignored. beta in [0, 0.5);
    beta = 0 is the plain mean, and a round of fewer than 1/beta sites trims nothing.
    """

    name: ClassVar[str] = "trimmed_mean"
    needs_all_updates: ClassVar[bool] = True

    beta: float = 0.1

    def __post_init__(self) -> None:
        check_number("trimmed_mean beta", self.beta, 0, 0.5, high_open=True)

    def trimmed(self, k: int) -> int:
        """b: how many values are dropped at each end of a coordinate among k updates."""
        return math.floor(self.beta * k)

    def min_updates(self) -> int:
        # beta < 1/2 gives 2 floor(beta K) < K for every K >= 1, so one update already leaves one value.
        return 1

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        k = len(updates)
        b = self.trimmed(k)
        if k - 2 * b < 1:
            raise FedmiError(f"trimmed_mean(beta={self.beta}) drops {2 * b} of {k} updates and keeps none")
        out = P.zeros_like(like)
        for name, cols, block in blocks.column_blocks(updates, like):
            kept = block.sort(dim=1).values[:, b: k - b].double().mean(dim=1)  # float64: no loss in the sum
            out[name].view(-1)[cols] = kept if out[name].is_floating_point() else kept.round()
        return out
