"""FedSGD (McMahan et al. 2017, survey ref. [12]): a site sends its full-batch gradient.

Δ_k = −∇F_k(w_t) over site k's whole training set. With the server's weighted mean and step
w ← w + η Σ_k (n_k/n) Δ_k, one round is exactly one step of full-batch gradient descent on the
pooled data (a test checks the identity).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedmi.core.batches import LocalSchedule
from fedmi.core.local import LocalMethod, SiteContext, State, register_method


@register_method
class FedSGD(LocalMethod):
    """One full-batch gradient at the global weights; no options."""

    name = "fedsgd"
    elementwise = True
    schedule = LocalSchedule(batch_size=None, local_steps=1)

    def options(self) -> dict:
        return {}

    def step(self, state: State, grads: dict[str, torch.Tensor], ctx: SiteContext) -> State:
        return {**state, "grad": grads}

    def final(self, state: State, ctx: SiteContext):
        grad = state["grad"]
        delta = OrderedDict((k, -grad[k] if k in grad else torch.zeros_like(v)) for k, v in ctx.global_params.items())
        return ctx.update(delta), None

    def __repr__(self) -> str:
        return "FedSGD()"
