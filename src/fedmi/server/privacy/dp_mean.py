"""The server half of client-level DP-FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018).

Every site's update arrives clipped to L2 norm C (`fedmi.client.privacy.clipped`); the server
clips again, so that a site that did not cannot widen the bound. The round's delta is

    delta = ( sum_k clip_C(delta_k) + N(0, (z·C)² I) ) / m

with m fixed in advance (the number of sites expected each round, not the number that came), so
that one site's presence or absence moves the sum by at most C whatever the others did: the
Gaussian mechanism with sensitivity C and noise multiplier z. Each site counts once, whatever its
size (a weight by sample count would let one large site move the sum by more than C). The
accountant (`fedmi.privacy.PrivacyAccountant`) records every round, and each round's record
carries the (ε, δ) spent so far. Noise is drawn from (seed, round), so every runtime, a resumed
run included, adds the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedmi.core import params as P
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import check_number
from fedmi.privacy import PrivacyAccountant, clip_to_norm, gaussian_noise_like
from fedmi.server.base import STEPS, Reducer
from fedmi.server.reducers import RunningSum


@STEPS.register()
@dataclass
class DpMean(Reducer):
    """( sum of updates clipped to C + N(0, (z·C)²) ) / m, with the privacy budget spent in its state.

    Args:
      clip_norm: C, the bound on each site's update (L2, floating-point entries).
      noise_multiplier: z; 0 adds no noise (and spends no budget: ε is infinite).
      expected_sites: m, the fixed denominator: the sites expected each round (q·N when each of N
        sites is sampled with probability q).
      delta: the δ at which ε is reported.
      sampling_rate: q, the probability with which each site takes part in a round (1: every site),
        by Poisson sampling (`fedmi.server.selection.PoissonSelector`): the accountant counts the
        amplification it gives.
    Example: ``DpMean(clip_norm=1.0, noise_multiplier=1.1, expected_sites=4) | ServerSGD(1.0)``
    """

    name: ClassVar[str] = "dp_mean"
    releases_empty: ClassVar[bool] = True  # a Poisson-sampled round with no site still releases its noise

    clip_norm: float
    noise_multiplier: float
    expected_sites: float
    delta: float = 1e-5
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        check_number("dp_mean clip_norm", self.clip_norm, 0, low_open=True)
        check_number("dp_mean noise_multiplier", self.noise_multiplier, 0)
        check_number("dp_mean expected_sites", self.expected_sites, 0, low_open=True)
        check_number("dp_mean delta", self.delta, 0, 1, low_open=True, high_open=True)
        check_number("dp_mean sampling_rate", self.sampling_rate, 0, 1, low_open=True)

    def init(self, params: P.ParamsT) -> Any:
        return PrivacyAccountant(self.delta).state_dict()

    def start(self, like: P.ParamsT) -> RunningSum:
        return RunningSum(like)

    def fold(self, acc: RunningSum, update: Update) -> RunningSum:
        clipped, _ = clip_to_norm(update.delta, self.clip_norm)  # again: a site that did not clip gains nothing
        return acc.add(1.0, clipped)

    def finish(self, acc: RunningSum, like: P.ParamsT) -> P.Params:
        raise NotImplementedError("dp_mean draws its noise from the round: finish_round")

    def finish_round(self, acc: RunningSum, like: P.ParamsT, state: Any, round_info: RoundInfo
                     ) -> tuple[P.Params, Any]:
        accountant = PrivacyAccountant.from_state(state)
        if self.noise_multiplier > 0:
            generator = torch_generator(Stream.PRIVACY_NOISE, round_info.seed, round_info.round)
            noise = gaussian_noise_like(like, self.noise_multiplier * self.clip_norm, generator)
            for k, v in acc.total.items():
                if like[k].is_floating_point():
                    v.add_(noise[k])
            accountant.spend(self.noise_multiplier, self.sampling_rate)
        acc.weight = float(self.expected_sites)  # the fixed denominator, however many sites came
        return acc.mean(), accountant.state_dict()

    def reduce_round(self, updates, like: P.ParamsT, state: Any, round_info: RoundInfo) -> tuple[P.Params, Any]:
        """The same aggregate when the round buffers its updates (a transform before this step)."""
        acc = self.start(like)
        for u in updates:
            acc = self.fold(acc, u)
        return self.finish_round(acc, like, state, round_info)

    def report(self, state: Any) -> dict[str, float]:
        accountant = PrivacyAccountant.from_state(state)
        epsilon = accountant.epsilon() if self.noise_multiplier > 0 else float("inf")
        return {"epsilon": epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier}
