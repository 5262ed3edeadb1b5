"""Local training: FedAvg (McMahan et al. 2017, survey ref. [12]) and FedProx (Li et al. 2020, ref. [165]).

FedAvg: each site runs local SGD (or Adam) from the global weights w_t and sends Δ_k = w_k − w_t.
FedProx: each site minimises h_k(w) = F_k(w) + (μ/2)‖w − w_t‖², which keeps heterogeneous sites
from drifting; μ = 0 gives FedAvg's result (a test checks it).

The update rules are torch.optim's, written out so that they are elementwise and run on many
sites' stacked tensors at once (g = ∇ + λ w in both):
    SGD  (torch.optim.SGD, no dampening or Nesterov):  b = β b + g (b starts at 0);  w ← w − η (b if β else g)
    Adam (torch.optim.Adam, Kingma & Ba 2015):  m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;
         w ← w − η (m / (1−β1^t)) / (√(v / (1−β2^t)) + ε),  t = the site's step count
The optimiser's state (momentum, Adam's moments and step count) stays at the site between rounds
as site state, as a client's optimiser object does in FLamby's strategies: it never reaches the
server, and training one site for E rounds of one epoch equals E epochs of ordinary training.

The learning rate follows the run: η_r = η γ^k in round r, k the number of `lr_milestones`
(fractions of the run's rounds) that r/rounds has reached. MedMNIST v2's schedule, ×0.1 at 50%
and 75% of training, is `lr_milestones=[0.5, 0.75]`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from fedmi.core.batches import LocalSchedule
from fedmi.core.local import LocalMethod, SiteContext, State, register_method
from fedmi.errors import FedmiError, check_number

OPTIMIZERS = ("sgd", "adam")


def _like(scalar: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-site scalar shaped to broadcast against w: () against one site's tensor, (sites,)
    against sites' stacked tensors (a runtime's elementwise path)."""
    return scalar.reshape(scalar.shape + (1,) * (w.dim() - scalar.dim()))


@register_method
class FedAvg(LocalMethod):
    """Local training from the global model (FedAvg) with SGD or Adam, as torch.optim's.

    Args:
      lr: local learning rate η.
      batch_size: samples per step (None: the whole training set).
      local_steps / local_epochs: local work per round (default 10 steps).
      momentum: SGD's β in [0, 1).
      weight_decay: λ >= 0 (L2 penalty added to the gradient).
      optimizer: "sgd" or "adam".
      betas, eps: Adam's β1, β2 in [0, 1) and ε > 0.
      lr_milestones: fractions of the run's rounds at which η is multiplied by `lr_gamma`.
      lr_gamma: the factor, in (0, 1].
    Example: ``FedAvg(lr=1e-3, optimizer="adam", local_epochs=1, lr_milestones=[0.5, 0.75])``.
    """

    name = "fedavg"
    elementwise = True
    default_budget: dict[str, int] = {"local_steps": 10}

    def __init__(self, lr: float = 0.05, batch_size: int | None = 32, local_steps: int | None = None,
                 local_epochs: int | None = None, momentum: float = 0.0, weight_decay: float = 0.0,
                 optimizer: Literal["sgd", "adam"] = "sgd", betas: tuple[float, float] | list[float] = (0.9, 0.999),
                 eps: float = 1e-8, lr_milestones: tuple[float, ...] | list[float] = (), lr_gamma: float = 0.1):
        check_number(f"{self.name} lr", lr, 0, low_open=True)
        check_number(f"{self.name} momentum", momentum, 0, 1, high_open=True)
        check_number(f"{self.name} weight_decay", weight_decay, 0)
        if optimizer not in OPTIMIZERS:
            raise FedmiError(f"{self.name} optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if optimizer == "adam" and momentum:
            raise FedmiError(f"{self.name}: momentum is SGD's; Adam's are betas")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise FedmiError(f"{self.name} betas must be two numbers [beta1, beta2], got {betas!r}")
        for i, beta in enumerate(betas):
            check_number(f"{self.name} beta{i + 1}", beta, 0, 1, high_open=True)
        check_number(f"{self.name} eps", eps, 0, low_open=True)
        check_number(f"{self.name} lr_gamma", lr_gamma, 0, 1, low_open=True)
        if not isinstance(lr_milestones, (list, tuple)):
            raise FedmiError(f"{self.name} lr_milestones must be a list of fractions of the rounds, got {lr_milestones!r}")
        for m in lr_milestones:
            check_number(f"{self.name} lr_milestones", m, 0, 1, low_open=True, high_open=True)
        if local_steps is None and local_epochs is None:  # the method's own budget
            local_steps, local_epochs = self.default_budget.get("local_steps"), self.default_budget.get("local_epochs")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.optimizer, self.betas, self.eps = optimizer, (float(betas[0]), float(betas[1])), eps
        self.lr_milestones, self.lr_gamma = tuple(sorted(float(m) for m in lr_milestones)), lr_gamma
        self.schedule = LocalSchedule(batch_size, local_steps, local_epochs)

    def options(self) -> dict[str, Any]:
        s = self.schedule
        return {"lr": self.lr, "batch_size": s.batch_size, "local_steps": s.local_steps,
                "local_epochs": s.local_epochs, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "optimizer": self.optimizer, "betas": list(self.betas), "eps": self.eps,
                "lr_milestones": list(self.lr_milestones), "lr_gamma": self.lr_gamma}

    def round_lr(self, ctx: SiteContext) -> float:
        """η in this round: η γ^k, k = the milestones that round / rounds has reached."""
        progress = ctx.round.round / max(1, ctx.round.num_rounds)
        return self.lr * self.lr_gamma ** sum(progress >= m for m in self.lr_milestones)

    def _optimizer_state(self, params: dict[str, torch.Tensor]) -> State:
        zeros = lambda: {k: torch.zeros_like(v) for k, v in params.items()}  # noqa: E731
        if self.optimizer == "adam":
            device = next(iter(params.values())).device
            return {"exp_avg": zeros(), "exp_avg_sq": zeros(), "step": torch.zeros((), device=device)}
        return {"momentum": zeros()} if self.momentum else {}

    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        state = super().init(global_params, site_state, ctx)
        saved = (site_state or {}).get("optimizer")
        # The site's own copy: a step updates it in place, and the kept state must not change under it.
        state["optimizer"] = ({k: v.clone() if isinstance(v, torch.Tensor) else {n: t.clone() for n, t in v.items()}
                               for k, v in saved.items()} if saved else self._optimizer_state(state["params"]))
        return state

    def step(self, state: State, grads: dict[str, torch.Tensor], ctx: SiteContext) -> State:
        # In place: the round's state owns these tensors, and a step on a small model is mostly
        # per-call overhead (one op per tensor, as torch.optim's own foreach-free update).
        lr = self.round_lr(ctx) if self.lr_milestones else self.lr
        if self.optimizer == "adam":
            return self._adam_step(state, grads, lr)
        momentum = state["optimizer"]["momentum"] if self.momentum else None
        for k, w in state["params"].items():
            g = grads[k].add(w, alpha=self.weight_decay) if self.weight_decay else grads[k]
            if momentum is not None:
                g = momentum[k].mul_(self.momentum).add_(g)
            w.sub_(g, alpha=lr)
        return state

    def _adam_step(self, state: State, grads: dict[str, torch.Tensor], lr: float) -> State:
        opt = state["optimizer"]
        opt["step"].add_(1)
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1 ** opt["step"], 1 - beta2 ** opt["step"]
        for k, w in state["params"].items():
            g = grads[k].add(w, alpha=self.weight_decay) if self.weight_decay else grads[k]
            m = opt["exp_avg"][k].mul_(beta1).add_(g, alpha=1 - beta1)
            v = opt["exp_avg_sq"][k].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v / _like(bias2, w)).sqrt_().add_(self.eps)
            w.sub_(m / denom / _like(bias1, w), alpha=lr)
        return state

    def final(self, state: State, ctx: SiteContext):
        update, _ = super().final(state, ctx)
        return update, ({"optimizer": state["optimizer"]} if state["optimizer"] else None)

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

