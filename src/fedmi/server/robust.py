"""Byzantine-robust reducers: coordinate-wise median and Krum. Both need every update at once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import torch

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.errors import FedmiError
from fedmi.server.base import STEPS, Reducer
from fedmi.server.reducers import Mean


def column_blocks(updates: Sequence[Update], like: P.ParamsT, max_elements: int = 1 << 22
                  ) -> Iterable[tuple[str, slice, torch.Tensor]]:
    """(name, columns, columns x K matrix of the updates' values) for blocks of each tensor.

    Stacking block by block keeps the working set to about `max_elements` beyond the updates.
    """
    width = max(1, max_elements // len(updates))
    for k, ref in like.items():
        n = ref.numel()
        for start in range(0, n, width):
            cols = slice(start, min(n, start + width))
            yield k, cols, torch.stack([u.delta[k].reshape(-1)[cols] for u in updates], dim=1)


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
        for k, cols, block in column_blocks(updates, like):
            ordered = block.sort(dim=1).values
            out[k].view(-1)[cols] = (ordered[:, lo] + ordered[:, hi]) / 2
        return out


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
        for _, _, block in column_blocks(updates, like):
            block = block.to(torch.float64)
            gram += block.T @ block
        sq = gram.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
        dist.fill_diagonal_(math.inf)
        return dist.sort(dim=1).values[:, : k - self.f - 2].sum(dim=1)

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        chosen = self.scores(updates, like).argsort()[: self.m].tolist()
        return Mean().reduce([updates[i] for i in chosen], like)
