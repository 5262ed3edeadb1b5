"""Local SGD: FedAvg (McMahan et al. 2017, survey ref. [12]) and FedProx (Li et al. 2020, ref. [165]).

FedAvg: each site runs local SGD from the global weights w_t and sends Δ_k = w_k − w_t.
FedProx: each site minimises h_k(w) = F_k(w) + (μ/2)‖w − w_t‖², which keeps heterogeneous sites
from drifting; μ = 0 gives FedAvg's result (a test checks it).

The SGD rule is torch.optim.SGD's (no dampening, no Nesterov), written out so that it is
elementwise and runs on many sites' stacked tensors at once:
    g = ∇ + λ w;  b = β b + g (b starts at 0, so the first b = g);  w ← w − η (b if β else g),
applied to the round's client state in place.
"""

from __future__ import annotations

from typing import Any

import torch

from fedmi.core.batches import LocalSchedule
from fedmi.core.local import LocalMethod, SiteContext, State, register_method
from fedmi.errors import check_number


@register_method
class FedAvg(LocalMethod):
    """Local SGD from the global model (FedAvg); momentum and weight decay as torch.optim.SGD.

    Args:
      lr: local learning rate η.
      batch_size: samples per step (None: the whole training set).
      local_steps / local_epochs: local work per round (default 10 steps).
      momentum: β in [0, 1).
      weight_decay: λ >= 0 (L2 penalty added to the gradient).
    """

    name = "fedavg"
    elementwise = True
    default_budget: dict[str, int] = {"local_steps": 10}

    def __init__(self, lr: float = 0.05, batch_size: int | None = 32, local_steps: int | None = None,
                 local_epochs: int | None = None, momentum: float = 0.0, weight_decay: float = 0.0):
        check_number(f"{self.name} lr", lr, 0, low_open=True)
        check_number(f"{self.name} momentum", momentum, 0, 1, high_open=True)
        check_number(f"{self.name} weight_decay", weight_decay, 0)
        if local_steps is None and local_epochs is None:  # the method's own budget
            local_steps, local_epochs = self.default_budget.get("local_steps"), self.default_budget.get("local_epochs")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.schedule = LocalSchedule(batch_size, local_steps, local_epochs)

    def options(self) -> dict[str, Any]:
        s = self.schedule
        return {"lr": self.lr, "batch_size": s.batch_size, "local_steps": s.local_steps,
                "local_epochs": s.local_epochs, "momentum": self.momentum, "weight_decay": self.weight_decay}

    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        state = super().init(global_params, site_state, ctx)
        if self.momentum:
            state["momentum"] = {k: torch.zeros_like(v) for k, v in state["params"].items()}
        return state

    def step(self, state: State, grads: dict[str, torch.Tensor], ctx: SiteContext) -> State:
        # In place: the round's state owns these tensors, and SGD on a small model is mostly
        # per-call overhead (one op per tensor, as torch.optim.SGD's own update).
        momentum = state.get("momentum")
        for k, w in state["params"].items():
            g = grads[k].add(w, alpha=self.weight_decay) if self.weight_decay else grads[k]
            if self.momentum:
                g = momentum[k].mul_(self.momentum).add_(g)
            w.sub_(g, alpha=self.lr)
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.options().items() if v is not None)})"


@register_method
class FedProx(FedAvg):
    """FedAvg's local SGD on h_k(w) = F_k(w) + (μ/2)‖w − w_t‖² (default: one local epoch, μ = 0.1).

    Args: those of `FedAvg`, and mu: the proximal coefficient μ >= 0.
    """

    name = "fedprox"
    default_budget = {"local_epochs": 1}

    def __init__(self, mu: float = 0.1, **kwargs: Any):
        check_number("fedprox mu", mu, 0)
        super().__init__(**kwargs)
        self.mu = mu

    def options(self) -> dict[str, Any]:
        return {**super().options(), "mu": self.mu}

    def regulariser(self, state: State, ctx: SiteContext) -> torch.Tensor:
        params = state["params"]
        return 0.5 * self.mu * sum(((w - ctx.global_params[k]) ** 2).sum() for k, w in params.items())

