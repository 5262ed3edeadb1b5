"""Client-level DP with the noise added at each site: the local variant of DP-FedAvg (survey §VI-A(2):
"add Gaussian random noise to the computed gradients ... in each client/site, thus protecting
privacy from the server and other clients").

Each site trains as its inner method says, then releases

    delta_k <- clip_C(delta_k) + N(0, (z·C)² I)

drawing the noise from its own generator (`SiteContext.update_noise`: from a key only it holds
when deployed), so the server never holds a noiseless update. Against the server the unit protected is
the site's whole training set: two training sets of one site give clipped updates at most 2C apart,
so each release is the Gaussian mechanism with noise multiplier z/2, and the site composes one
per round it trains in (`fedmi.client.privacy.budget`): its ε, reported with each update, holds
against everyone, the server included. The server averages what arrives (post-processing) and
cannot re-clip: the noise has norm far above C.

Against the central variant (noise z·C once on the sum, `fedmi.server.privacy.dp_mean`) the mean
carries noise z·C/√m from m sites rather than z·C/m: the price of not trusting the server.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fedmi.client.privacy.budget import BudgetedMethod
from fedmi.core import params as P
from fedmi.core.local import LocalMethod, SiteContext, State, register_method
from fedmi.errors import check_number
from fedmi.privacy import clip_to_norm, gaussian_noise_like


@register_method
class LocalDp(BudgetedMethod):
    """Another local method whose every update is clipped to C and noised at the site.

    Args:
      inner: the method every site trains with (a `LocalMethod`, or its `spec()`).
      clip_norm: C, the bound on each update's L2 norm (floating-point entries).
      noise_multiplier: z; the noise's standard deviation is z·C.
      delta: the δ at which each site reports its ε.
      max_rounds: the most rounds a site trains in the run (None: no limit).
    Example: ``LocalDp(make_method("fedavg"), clip_norm=0.1, noise_multiplier=1.0)``
    """

    name = "dp_local"
    budget_key, label = "dp_local_budget", "local DP"

    def __init__(self, inner: LocalMethod | dict, clip_norm: float, noise_multiplier: float, delta: float = 1e-5,
                 max_rounds: int | None = None):
        super().__init__(inner, noise_multiplier, delta, max_rounds)
        self.clip_norm = check_number("dp_local clip_norm", clip_norm, 0, low_open=True)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "clip_norm": self.clip_norm}

    def accounted_multiplier(self) -> float:
        return self.noise_multiplier / 2  # neighbouring training sets of one site: updates up to 2C apart

    def release(self, state: State, ctx: SiteContext):
        update, kept = self.inner.final(state, ctx)
        clipped, _ = clip_to_norm(update.delta, self.clip_norm)
        if self.noise_multiplier > 0:
            noise = gaussian_noise_like(clipped, self.noise_multiplier * self.clip_norm, ctx.update_noise())
            clipped = P.Params((k, v + noise[k]) for k, v in clipped.items())
        return replace(update, delta=clipped), kept

    def __repr__(self) -> str:
        return f"LocalDp({self.inner!r}, clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier})"
