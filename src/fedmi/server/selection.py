"""Site selection: which sites train in a round. Selectors see only `SiteInfo`, never data.

The extension point is `fedmi.core.runner.Selector` (`select(sites, round_info, rng) -> names`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedmi.core.rng import Stream, numpy_generator
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


@dataclass
class PoissonSelector:
    """Each site independently with probability q each round (Poisson sampling), as the privacy
    accountant's amplification by sampling assumes (McMahan et al. 2018). A round may take no site:
    a private aggregate then releases its noise alone.
    """

    rate: float

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise FedmiError(f"site sampling rate must be in (0, 1], got {self.rate}")

    def select(self, sites: Sequence[SiteInfo], round_info: RoundInfo, rng: np.random.Generator) -> list[str]:
        taken = rng.random(len(sites)) < self.rate
        return [s.name for s, t in zip(sites, taken) if t]


@dataclass
class CyclicSelector:
    """Cyclic weight transfer (Chang et al. 2018, "Distributed deep learning networks among
    institutions for medical imaging"; FLamby's Cyclic): one site a round, so the model travels from
    site to site; every full cycle visits each site once, in an order reshuffled every cycle.

    The order of cycle c is drawn from the run's seed and c alone (not from the server's selection
    generator), so a resumed run visits the same sites. With the server taking the one update whole
    (`weighted_mean`), round t trains the model the previous round's site handed on.
    """

    shuffle: bool = True  # False: the federation's order every cycle

    def select(self, sites: Sequence[SiteInfo], round_info: RoundInfo, rng: np.random.Generator) -> list[str]:
        cycle, position = divmod(round_info.round, len(sites))
        order = numpy_generator(Stream.SELECTION, round_info.seed, 1, cycle).permutation(len(sites)) \
            if self.shuffle else np.arange(len(sites))
        return [sites[int(order[position])].name]


def make_selector(fraction: float = 1.0, cyclic: bool = False) -> Selector:
    """Every site each round (fraction 1), a random fraction of them, or one site a round in cycles."""
    if cyclic:
        return CyclicSelector()
    return AllSites() if fraction >= 1.0 else FractionSelector(fraction)
