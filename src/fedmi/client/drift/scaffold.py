"""SCAFFOLD's site side (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, Algorithm 1 with option II).

Each site keeps a control variate c_i (site state, zero at first); the server's control variate c
comes with the parameters (`RoundInfo.extras`, from the `scaffold` aggregation step). Local SGD
corrects every gradient by the drift between the two:

    y <- y - eta (g(y) - c_i + c)                       (K steps from y = x, the global model)
    c_i+ = c_i - c + (x - y) / (K eta)                  (option II)

and the site sends delta = y - x with the extra Delta c_i = c_i+ - c_i = -c - delta / (K eta).
Only SGD without momentum is defined (the control variates estimate plain gradients).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fedmi.client.sgd import FedAvg
from fedmi.core.extras import SCAFFOLD_CONTROL_DELTA, SCAFFOLD_SERVER_CONTROL
from fedmi.core.local import SiteContext, State, register_method
from fedmi.errors import FedmiError


@register_method
class Scaffold(FedAvg):
    """Local SGD with SCAFFOLD's drift correction; pair it with the `scaffold` aggregation step.

    Args: those of `FedAvg` (lr, batch_size, local_steps or local_epochs, weight_decay, lr_milestones);
      the optimiser must be SGD without momentum.
    Example: ``make_method("scaffold", lr=0.01, local_steps=100)`` with aggregator ``"scaffold"``.
    """

    name = "scaffold"
    default_aggregator = "scaffold"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.optimizer != "sgd" or self.momentum:
            raise FedmiError("scaffold: its control variates are defined for SGD without momentum "
                             f"(got optimizer={self.optimizer}, momentum={self.momentum}); in fedmi table2: "
                             "--method-options '{scaffold: {optimizer: sgd, lr: 0.01}}'")

    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        state = super().init(global_params, site_state, ctx)
        params = state["params"]
        own = (site_state or {}).get("control") or {k: torch.zeros_like(v) for k, v in params.items()}
        server = {k: ctx.round.extras.get(SCAFFOLD_SERVER_CONTROL + k) for k in params}
        server = {k: torch.zeros_like(params[k]) if v is None else v.to(params[k].dtype) for k, v in server.items()}
        state["control"] = {k: v.clone() for k, v in own.items()}
        state["correction"] = {k: server[k] - own[k] for k in params}  # c - c_i, added to every gradient
        return state

    def step(self, state: State, grads: dict[str, torch.Tensor], ctx: SiteContext) -> State:
        correction = state["correction"]
        return super().step(state, {k: g + correction[k] for k, g in grads.items()}, ctx)

    def final(self, state: State, ctx: SiteContext):
        update, kept = super().final(state, ctx)
        scale = 1.0 / (max(ctx.local_steps, 1) * self.round_lr(ctx))
        own, correction = state["control"], state["correction"]
        # Delta c_i = -c - delta / (K eta), with c = (c - c_i) + c_i.
        change = {k: -(correction[k] + own[k]) - update.delta[k] * scale for k in own}
        extras = {**update.extras, **{SCAFFOLD_CONTROL_DELTA + k: v for k, v in change.items()}}
        kept = {**(kept or {}), "control": {k: own[k] + change[k] for k in own}}
        return replace(update, extras=extras), kept
