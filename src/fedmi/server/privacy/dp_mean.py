"""The server half of client-level DP-FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018).

Every site's update arrives clipped to L2 norm C (`fedmi.client.privacy.clipped`); the server
clips again, so that a site that did not cannot widen the bound. The round's delta is

    delta = ( sum_k clip_C(delta_k) + N(0, (z·C)² I) ) / m

with m fixed in advance (the number of sites expected each round, not the number that came), so
that one site's presence or absence moves the sum by at most C whatever the others did: the
Gaussian mechanism with sensitivity C and noise multiplier z. Each site counts once, whatever its
size (a weight by sample count would let one large site move the sum by more than C).

`dp_mean` is three steps of the chain, each streaming: `norm_bound(max_norm=C)` clips each update as
it arrives, `fixed_mean(expected_sites=m)` sums them over m, and `gaussian_noise` adds N(0, (z·C/m)²)
to that mean and keeps the accountant (`fedmi.privacy.PrivacyAccountant`) in its state, so each
round's record carries the (ε, δ) spent so far. Noise is drawn from (seed, round), so every runtime,
a resumed run included, adds the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedmi.core import params as P
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import check_number
from fedmi.privacy import PrivacyAccountant, gaussian_noise_like
from fedmi.server.base import STEPS, AggregationPipeline, DeltaTransform
from fedmi.server.reducers import RunningSum, WeightedMean
from fedmi.server.robust.norm_bound import NormBound


@STEPS.register()
@dataclass
class FixedMean(WeightedMean):
    """sum_k delta_k / m with m fixed in advance, however many sites came (every site counts once).

    Args:
      expected_sites: m, the sites expected each round (q·N when each of N sites is sampled with
        probability q). A round with no update releases a zero delta (for the noise after it).
    """

    name: ClassVar[str] = "fixed_mean"
    releases_empty: ClassVar[bool] = True  # a Poisson-sampled round with no site still releases its noise

    expected_sites: float = 1.0

    def __post_init__(self) -> None:
        check_number("fixed_mean expected_sites", self.expected_sites, 0, low_open=True)

    def fold(self, acc: RunningSum, update: Update) -> RunningSum:
        return acc.add(1.0, update.delta)

    def finish(self, acc: RunningSum, like: P.ParamsT) -> P.Params:
        acc.weight = float(self.expected_sites)
        return acc.mean()


@STEPS.register()
@dataclass
class GaussianNoise(DeltaTransform):
    """delta + N(0, (z·C/m)² I) on the floating-point entries, and the privacy budget spent in its state.

    Args:
      clip_norm: C, the bound on each site's update (clipped before the reducer).
      noise_multiplier: z; 0 adds no noise (and spends no budget: ε is infinite).
      expected_sites: m, the reducer's fixed denominator.
      delta: the δ at which ε is reported.
      sampling_rate: q, the probability with which each site takes part in a round (1: every site),
        by Poisson sampling (`fedmi.server.selection.PoissonSelector`): the accountant counts the
        amplification it gives.
    """

    name: ClassVar[str] = "gaussian_noise"

    clip_norm: float
    noise_multiplier: float
    expected_sites: float = 1.0
    delta: float = 1e-5
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        check_number("gaussian_noise clip_norm", self.clip_norm, 0, low_open=True)
        check_number("gaussian_noise noise_multiplier", self.noise_multiplier, 0)
        check_number("gaussian_noise expected_sites", self.expected_sites, 0, low_open=True)
        check_number("gaussian_noise delta", self.delta, 0, 1, low_open=True, high_open=True)
        check_number("gaussian_noise sampling_rate", self.sampling_rate, 0, 1, low_open=True)

    def init(self, params: P.ParamsT) -> Any:
        return PrivacyAccountant(self.delta).state_dict()

    def transform_delta(self, delta: P.Params, state: Any, round_info: RoundInfo) -> tuple[P.Params, Any]:
        if self.noise_multiplier == 0:
            return delta, state
        accountant = PrivacyAccountant.from_state(state)
        generator = torch_generator(Stream.PRIVACY_NOISE, round_info.seed, round_info.round)
        noise = gaussian_noise_like(delta, self.noise_multiplier * self.clip_norm / self.expected_sites, generator)
        accountant.spend(self.noise_multiplier, self.sampling_rate)
        return P.Params((k, v + noise[k] if v.is_floating_point() else v) for k, v in delta.items()), \
            accountant.state_dict()

    def report(self, state: Any) -> dict[str, float]:
        accountant = PrivacyAccountant.from_state(state)
        epsilon = accountant.epsilon() if self.noise_multiplier > 0 else float("inf")
        return {"epsilon": epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier}


def dp_mean(clip_norm: float, noise_multiplier: float, expected_sites: float, delta: float = 1e-5,
            sampling_rate: float = 1.0) -> AggregationPipeline:
    """( sum of updates clipped to C + N(0, (z·C)²) ) / m: clip, fixed mean, noise (see the module).

    Args: as `GaussianNoise`'s.
    Returns: the three steps, to chain with a server optimiser.
    Example: ``dp_mean(clip_norm=1.0, noise_multiplier=1.1, expected_sites=4) | ServerSGD(1.0)``
    """
    return (NormBound(max_norm=clip_norm) | FixedMean(expected_sites)
            | GaussianNoise(clip_norm, noise_multiplier, expected_sites, delta, sampling_rate))


STEPS.register("dp_mean")(dp_mean)
