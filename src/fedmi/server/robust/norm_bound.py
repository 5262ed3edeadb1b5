"""Norm bounding: scale down every update longer than a bound before the reducer.

Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?" (arXiv:1911.07963,
2019), the norm-thresholding defence: a backdoor rides on large updates, and the server averages
delta_k / max(1, ||delta_k|| / M), each update clipped to the norm M, which blunts it at little cost
to the main task.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError, check_number
from fedmi.privacy import clip_to_norm, float_norm
from fedmi.server.base import STEPS, UpdateTransform


@STEPS.register()
@dataclass
class NormBound(UpdateTransform):
    """delta_k <- delta_k * min(1, M / ||delta_k||) for every update (Sun et al. 2019, norm thresholding).

    M is `max_norm`, or with `factor` the round's own scale, M = factor * median_k ||delta_k||
    (the mean of the two middle norms for an even count); exactly one of the two is given.
    ||.|| is the L2 norm over the update's floating-point entries, which are the ones scaled:
    integer entries (batch norm's step counter) are counts, not directions, and pass unchanged.
    """

    name: ClassVar[str] = "norm_bound"

    max_norm: float | None = None
    factor: float | None = None

    def __post_init__(self) -> None:
        if (self.max_norm is None) == (self.factor is None):
            raise FedmiError("norm_bound needs exactly one of max_norm (a fixed bound) and factor (times the "
                             f"round's median norm), got max_norm={self.max_norm!r}, factor={self.factor!r}")
        if self.max_norm is not None:
            check_number("norm_bound max_norm", self.max_norm, 0, low_open=True)
        else:
            check_number("norm_bound factor", self.factor, 0, low_open=True)

    @staticmethod
    def norm(update: Update) -> float:
        """||delta|| over the floating-point entries, accumulated in float64."""
        return float_norm(update.delta)

    def bound(self, norms: list[float]) -> float:
        """M for a round whose updates have these norms."""
        return self.max_norm if self.max_norm is not None else self.factor * statistics.median(norms)

    @property
    def needs_all_updates(self) -> bool:  # a fixed bound clips each update as it arrives
        return self.factor is not None

    def map_update(self, update: Update, state: Any, round_info: RoundInfo) -> tuple[Update, Any]:
        if self.factor is not None:
            return super().map_update(update, state, round_info)
        return self._bounded(update, self.max_norm), state

    def transform(self, updates: list[Update], state: Any, round_info: RoundInfo) -> tuple[list[Update], Any]:
        if self.factor is None or not updates:
            return super().transform(updates, state, round_info)
        bound = self.bound([self.norm(u) for u in updates])
        return [self._bounded(u, bound) for u in updates], state

    @staticmethod
    def _bounded(update: Update, bound: float) -> Update:
        """The update as it came if within the bound (a zero update included), else clipped to it."""
        delta, norm = clip_to_norm(update.delta, bound)
        return update if norm <= bound else replace(update, delta=delta)
