"""The geometric median of the updates: robust aggregation (RFA) by Weiszfeld's algorithm.

Pillutla, Kakade and Harchaoui, "Robust Aggregation for Federated Learning", IEEE Trans. Signal
Processing 70 (2022): the aggregate is the weighted geometric median (their eq. 3, Algorithm 2,
smoothed Weiszfeld), which a minority of arbitrary updates cannot drag far away.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.errors import FedmiError, check_number
from fedmi.server.base import STEPS, Reducer
from fedmi.server.robust import blocks


@STEPS.register()
@dataclass
class GeometricMedian(Reducer):
    """Weighted geometric median (Pillutla et al. 2022, RFA): z = argmin_z sum_k w_k ||delta_k - z||, w_k = n_k / n.

    Smoothed Weiszfeld iteration, from the weighted mean z_0 = sum_k w_k delta_k:

        beta_k  = w_k / max(eps, ||delta_k - z_t||)
        z_{t+1} = sum_k beta_k delta_k / sum_k beta_k

    until ||z_{t+1} - z_t|| <= tol ||z_{t+1}||, or after max_iter steps. Norms are over the whole
    flattened update, accumulated in float64; z is kept in float64 and cast back at the end (integer
    entries rounded). Each step is one pass over the updates in column blocks, O(K x model) memory.
    """

    name: ClassVar[str] = "geometric_median"
    needs_all_updates: ClassVar[bool] = True

    eps: float = 1e-6
    max_iter: int = 100
    tol: float = 1e-7

    def __post_init__(self) -> None:
        check_number("geometric_median eps", self.eps, 0, low_open=True)
        check_number("geometric_median tol", self.tol, 0)
        if not isinstance(self.max_iter, int) or isinstance(self.max_iter, bool) or self.max_iter < 1:
            raise FedmiError(f"geometric_median max_iter must be an integer of at least 1, got {self.max_iter!r}")

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        w = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
        w /= w.sum()
        z = OrderedDict((k, torch.zeros(v.numel(), dtype=torch.float64)) for k, v in like.items())
        dist2 = self._step(updates, like, z, w)  # z_0: the weighted mean
        for _ in range(self.max_iter):
            beta = w / dist2.sqrt().clamp_min(self.eps)
            change = [0.0, 0.0]
            dist2 = self._step(updates, like, z, beta / beta.sum(), change)
            if math.sqrt(change[0]) <= self.tol * math.sqrt(change[1]):
                break
        return OrderedDict((k, (z[k] if v.is_floating_point() else z[k].round()).reshape(v.shape).to(v.dtype))
                           for k, v in like.items())

    @staticmethod
    def _step(updates: Sequence[Update], like: P.ParamsT, z: dict[str, torch.Tensor], coef: torch.Tensor,
              change: list[float] | None = None) -> torch.Tensor:
        """z <- sum_k coef_k delta_k in place, block by block; returns ||delta_k - z||^2 for the new z.

        The distances to the new z are summed over the same blocks that make it, so one pass over the
        updates serves both halves of a Weiszfeld step. `change`, if given, receives
        [||z_new - z_old||^2, ||z_new||^2].
        """
        dist2 = torch.zeros(len(updates), dtype=torch.float64)
        for k, cols, block in blocks.column_blocks(updates, like):
            block = block.to(torch.float64)
            new = block @ coef
            if change is not None:
                change[0] += float(((new - z[k][cols]) ** 2).sum())
                change[1] += float((new ** 2).sum())
            z[k][cols] = new
            dist2 += ((block - new[:, None]) ** 2).sum(dim=0)
        return dist2
