"""Client-level DP-FedAvg with adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy,
"Differentially Private Learning with Adaptive Clipping", NeurIPS 2021).

A fixed clipping bound C must be guessed before training, and update norms shrink as training
goes on. Adaptive clipping tracks a quantile γ of the sites' update norms instead, privately. In
round t every site clips to the bound C_t the server broadcast and sends, besides its clipped
update, the bit b_k = 1[||Δ_k|| ≤ C_t] (`fedmi.client.privacy.clipped`, `adaptive`). The server
releases

    Δ̄  = ( Σ_k clip_{C_t}(Δ_k) + N(0, (z_Δ·C_t)² I) ) / m
    b̄  = ( Σ_k b_k + N(0, σ_b²) ) / m
    C_{t+1} = C_t · exp(−η_C (b̄ − γ))            (the geometric update)

The two sums together are one Gaussian mechanism with noise multiplier z when
z_Δ = (z^−2 − (2σ_b)^−2)^−1/2 (the bits' sum moves by 1/2 around its centre): the accountant counts
z, and a run calibrated to a target ε spends exactly it. The bound and the accountant are this
step's state (checkpointed); the bound is broadcast, and reported in each round's record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedmi.core import params as P
from fedmi.core.extras import CLIP_NORM, WITHIN_BOUND
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError, check_number
from fedmi.privacy import PrivacyAccountant, clip_to_norm, gaussian_noise_like
from fedmi.server.base import STEPS, Reducer
from fedmi.server.reducers import RunningSum


@STEPS.register()
@dataclass
class AdaptiveDpMean(Reducer):
    """The clipped sum with noise over m sites, its bound following the γ-quantile of the update norms.

    Args:
      initial_clip: C_0, the first round's bound.
      noise_multiplier: z, of the two sums together (the update's own is z_Δ, see the module).
      expected_sites: m, the fixed denominator (q·N under Poisson sampling of sites).
      target_quantile: γ, the share of updates that should fall within the bound (0.5: the median).
      learning_rate: η_C of the geometric update.
      count_noise: σ_b, the noise on the sum of the bits (None: m / 20, the paper's choice).
      delta: the δ at which ε is reported.
      sampling_rate: q, each site's probability of taking part in a round (Poisson sampling).
    Example: ``AdaptiveDpMean(initial_clip=0.1, noise_multiplier=1.0, expected_sites=100) | ServerSGD(1.0)``
    """

    name: ClassVar[str] = "adaptive_dp_mean"
    releases_empty: ClassVar[bool] = True  # a Poisson-sampled round with no site still releases its noise

    initial_clip: float
    noise_multiplier: float
    expected_sites: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float | None = None
    delta: float = 1e-5
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        check_number("adaptive_dp_mean initial_clip", self.initial_clip, 0, low_open=True)
        check_number("adaptive_dp_mean noise_multiplier", self.noise_multiplier, 0)
        check_number("adaptive_dp_mean expected_sites", self.expected_sites, 0, low_open=True)
        check_number("adaptive_dp_mean target_quantile", self.target_quantile, 0, 1)
        check_number("adaptive_dp_mean learning_rate", self.learning_rate, 0)
        check_number("adaptive_dp_mean delta", self.delta, 0, 1, low_open=True, high_open=True)
        check_number("adaptive_dp_mean sampling_rate", self.sampling_rate, 0, 1, low_open=True)
        if self.count_noise is None:
            self.count_noise = self.expected_sites / 20
        check_number("adaptive_dp_mean count_noise", self.count_noise, 0, low_open=True)
        if self.noise_multiplier > 0 and self.noise_multiplier >= 2 * self.count_noise:
            raise FedmiError(f"adaptive_dp_mean: the bits' noise σ_b = {self.count_noise:.3g} takes the whole budget of "
                             f"noise multiplier {self.noise_multiplier:.3g} (it needs σ_b > z/2); raise count_noise")

    def update_noise_multiplier(self) -> float:
        """z_Δ, the noise multiplier of the updates' sum: (z^−2 − (2σ_b)^−2)^−1/2."""
        if self.noise_multiplier == 0:
            return 0.0
        return (self.noise_multiplier ** -2 - (2 * self.count_noise) ** -2) ** -0.5

    def init(self, params: P.ParamsT) -> Any:
        return {"clip_norm": float(self.initial_clip), "accountant": PrivacyAccountant(self.delta).state_dict()}

    def broadcast(self, state: Any) -> dict[str, torch.Tensor]:
        return {CLIP_NORM: torch.tensor(float(state["clip_norm"]), dtype=torch.float64)}

    def start_round(self, like: P.ParamsT, state: Any, round_info: RoundInfo) -> dict:
        return {"sum": RunningSum(like), "clip_norm": float(state["clip_norm"]), "within": 0.0}

    def fold(self, acc: dict, update: Update) -> dict:
        bit = update.extras.get(WITHIN_BOUND)
        if bit is None or bit.numel() != 1:
            raise FedmiError(f"adaptive_dp_mean: the update from site {update.site} does not say whether it was within "
                             "the bound (its trainer must be dp_clip with adaptive)")
        if not math.isfinite(value := float(bit)):
            raise FedmiError(f"adaptive_dp_mean: the update from site {update.site} says it was {value} within the bound")
        clipped, _ = clip_to_norm(update.delta, acc["clip_norm"])  # again: a site that did not clip gains nothing
        acc["sum"].add(1.0, clipped)
        acc["within"] += min(max(value, 0.0), 1.0)  # one site moves the count by at most one
        return acc

    def start(self, like: P.ParamsT) -> dict:
        raise NotImplementedError("adaptive_dp_mean folds at the round's bound: start_round")

    def finish(self, acc: dict, like: P.ParamsT) -> P.Params:
        raise NotImplementedError("adaptive_dp_mean draws its noise from the round: finish_round")

    def finish_round(self, acc: dict, like: P.ParamsT, state: Any, round_info: RoundInfo) -> tuple[P.Params, Any]:
        total, clip, m = acc["sum"], acc["clip_norm"], float(self.expected_sites)
        accountant = PrivacyAccountant.from_state(state["accountant"])
        within = acc["within"]
        if self.noise_multiplier > 0:
            noise = gaussian_noise_like(like, self.update_noise_multiplier() * clip,
                                        torch_generator(Stream.PRIVACY_NOISE, round_info.seed, round_info.round))
            for k, v in total.total.items():
                if like[k].is_floating_point():
                    v.add_(noise[k])
            bit_noise = torch_generator(Stream.PRIVACY_NOISE, round_info.seed, round_info.round, 1)
            within += float(torch.randn((), generator=bit_noise, dtype=torch.float64)) * self.count_noise
            accountant.spend(self.noise_multiplier, self.sampling_rate)
        total.weight = m  # the fixed denominator, however many sites came
        share = within / m
        new_clip = clip * math.exp(-self.learning_rate * (share - self.target_quantile))
        return total.mean(), {"clip_norm": new_clip, "accountant": accountant.state_dict()}

    def reduce_round(self, updates, like: P.ParamsT, state: Any, round_info: RoundInfo) -> tuple[P.Params, Any]:
        """The same aggregate when the round buffers its updates (a transform before this step)."""
        acc = self.start_round(like, state, round_info)
        for u in updates:
            acc = self.fold(acc, u)
        return self.finish_round(acc, like, state, round_info)

    def report(self, state: Any) -> dict[str, float]:
        accountant = PrivacyAccountant.from_state(state["accountant"])
        epsilon = accountant.epsilon() if self.noise_multiplier > 0 else float("inf")
        return {"epsilon": epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clip_norm": state["clip_norm"]}
