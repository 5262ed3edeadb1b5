"""Site selection: which sites train in a round. Selectors see only `SiteInfo`, never data.

The extension point is `fedmi.core.runner.Selector` (`select(sites, round_info, rng) -> names`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedmi.core.runner import Selector
from fedmi.core.types import RoundInfo, SiteInfo
from fedmi.errors import FedmiError


@dataclass
class AllSites:
    def select(self, sites: Sequence[SiteInfo], round_info: RoundInfo, rng: np.random.Generator) -> list[str]:
        return [s.name for s in sites]


@dataclass
class FractionSelector:
    """A uniformly random fraction C of the sites each round (McMahan et al. 2017), at least `min_sites`."""

    fraction: float
    min_sites: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise FedmiError(f"selection fraction must be in (0, 1], got {self.fraction}")

    def select(self, sites: Sequence[SiteInfo], round_info: RoundInfo, rng: np.random.Generator) -> list[str]:
        k = min(len(sites), max(self.min_sites, int(round(self.fraction * len(sites)))))
        chosen = rng.choice(len(sites), size=k, replace=False)
        return [sites[i].name for i in sorted(chosen)]


def make_selector(fraction: float = 1.0) -> Selector:
    return AllSites() if fraction >= 1.0 else FractionSelector(fraction)
