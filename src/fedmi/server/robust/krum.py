"""Krum and Multi-Krum: keep the updates that lie closest to their neighbours.

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"
(NeurIPS 2017) define Krum and Multi-Krum; El Mhamdi et al., "The Hidden Vulnerability of
Distributed Learning in Byzantium" (ICML 2018) use Multi-Krum with m = K - f.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.errors import FedmiError
from fedmi.server.base import STEPS, Reducer
from fedmi.server.reducers import Mean
from fedmi.server.robust import blocks


@STEPS.register()
@dataclass
class Krum(Reducer):
    """Krum (Blanchard et al. 2017): the update closest to its neighbours, tolerating f bad sites.

    score(i) = sum of ||delta_i - delta_j||^2 over the K - f - 2 nearest other updates j; the
    result is the update with the lowest score, or with m > 1 (Multi-Krum) the mean of the m
    lowest-scoring updates. Needs K >= 2f + 3 updates.
    """

    name: ClassVar[str] = "krum"
    needs_all_updates: ClassVar[bool] = True

    f: int = 1
    m: int = 1

    def __post_init__(self) -> None:
        for what, value, low in (("f", self.f, 0), ("m", self.m, 1)):
            if not isinstance(value, int) or value < low:
                raise FedmiError(f"krum {what} must be an integer of at least {low}, got {value!r}")

    def min_updates(self) -> int:
        return 2 * self.f + 3

    def scores(self, updates: Sequence[Update], like: P.ParamsT) -> torch.Tensor:
        k = len(updates)
        if k < 2 * self.f + 3:
            raise FedmiError(f"krum with f={self.f} needs at least {2 * self.f + 3} updates, got {k}")
        gram = torch.zeros(k, k, dtype=torch.float64)
        for _, _, block in blocks.column_blocks(updates, like):
            block = block.to(torch.float64)
            gram += block.T @ block
        sq = gram.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
        dist.fill_diagonal_(math.inf)
        return dist.sort(dim=1).values[:, : k - self.f - 2].sum(dim=1)

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        chosen = self.scores(updates, like).argsort()[: self.m].tolist()
        return Mean().reduce([updates[i] for i in chosen], like)


@STEPS.register()
@dataclass
class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017, §5; El Mhamdi et al. 2018): the mean of the m best by Krum's score.

    With score(i) as in `krum`, delta = 1/m sum_{i in S} delta_i, S the m updates of lowest score;
    m = None takes m = K - f, every update but the f presumed bad. Sites' sizes are ignored.
    Needs K >= 2f + 3 updates, and K >= m.
    """

    name: ClassVar[str] = "multi_krum"

    f: int = 1
    m: int | None = None  # type: ignore[assignment]  # None: K - f, known only in the round

    def __post_init__(self) -> None:
        if not isinstance(self.f, int) or isinstance(self.f, bool) or self.f < 0:
            raise FedmiError(f"multi_krum f must be an integer of at least 0, got {self.f!r}")
        if self.m is not None and (not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1):
            raise FedmiError(f"multi_krum m must be None or an integer of at least 1, got {self.m!r}")

    def min_updates(self) -> int:
        return max(2 * self.f + 3, self.m or 1)

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        k = len(updates)
        m = k - self.f if self.m is None else self.m
        if m > k:
            raise FedmiError(f"multi_krum with m={m} needs at least {m} updates, got {k}")
        # Kept in arrival order, so that keeping every update sums exactly as `mean` does.
        chosen = sorted(self.scores(updates, like).argsort()[:m].tolist())
        return Mean().reduce([updates[i] for i in chosen], like)
