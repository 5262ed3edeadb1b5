"""Clipped updates: the site half of client-level DP-FedAvg (McMahan, Ramage, Talwar and Zhang,
"Learning Differentially Private Recurrent Language Models", ICLR 2018; survey §VI-A).

Each site trains as its inner method says, then bounds its update before sending it:

    delta_k <- delta_k · min(1, C / ||delta_k||_2)

so that one site's contribution to the server's sum has L2 norm at most C, whatever its data.
The server adds Gaussian noise calibrated to C to that sum (`fedmi.server.privacy.dp_mean`): the
clipping happens here, at the site, so the server never receives an unclipped update.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fedmi.client.wrapped import WrappedMethod
from fedmi.core.extras import CLIP_NORM, WITHIN_BOUND
from fedmi.core.local import LocalMethod, SiteContext, State, register_method
from fedmi.errors import check_number
from fedmi.privacy import clip_to_norm


@register_method
class ClippedUpdates(WrappedMethod):
    """Another local method whose every update is clipped to L2 norm `clip_norm` at the site.

    Args:
      inner: the method every site trains with (a `LocalMethod`, or its `spec()`).
      clip_norm: C, the bound on each update's L2 norm (floating-point entries).
      adaptive: clip to the bound the server broadcasts each round instead (adaptive clipping, Andrew
        et al. 2021: `fedmi.server.privacy.adaptive_clip`), and send whether the update was within it.
    Example: ``ClippedUpdates(make_method("fedavg"), clip_norm=1.0)``
    """

    name = "dp_clip"

    def __init__(self, inner: LocalMethod | dict, clip_norm: float, adaptive: bool = False):
        super().__init__(inner)
        self.clip_norm = check_number("dp_clip clip_norm", clip_norm, 0, low_open=True)
        self.adaptive = bool(adaptive)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "clip_norm": self.clip_norm, **({"adaptive": True} if self.adaptive else {})}

    def final(self, state: State, ctx: SiteContext):
        update, kept = self.inner.final(state, ctx)
        bound = float(ctx.round.extras[CLIP_NORM]) if self.adaptive else self.clip_norm
        clipped, norm = clip_to_norm(update.delta, bound)
        # Nothing about the unclipped update leaves but, under adaptive clipping, whether it was within
        # the bound: one bit, which the server sums with noise (`fedmi.server.privacy.adaptive_clip`).
        extras = {**update.extras, WITHIN_BOUND: torch.tensor(float(norm <= bound))} if self.adaptive else update.extras
        return replace(update, delta=clipped, extras=extras), kept

    def __repr__(self) -> str:
        return f"ClippedUpdates({self.inner!r}, clip_norm={self.clip_norm})"
