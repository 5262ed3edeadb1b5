"""Server optimisers: how the round's aggregated delta moves the global parameters.

ServerSGD (FedAvg's w + delta, FedSGD's step) and the adaptive server optimisers of Reddi et al.,
"Adaptive Federated Optimization" (ICLR 2021), Algorithm 2: FedAdagrad, FedAdam and FedYogi.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedmi.core import params as P
from fedmi.errors import check_number
from fedmi.server.base import STEPS, ServerOptimizer


@STEPS.register()
@dataclass
class ServerSGD(ServerOptimizer):
    """w <- w + lr * delta. lr = 1 applies FedAvg's average as is; FedSGD's step size is lr."""

    name: ClassVar[str] = "server_sgd"

    lr: float = 1.0

    def __post_init__(self) -> None:
        check_number("server_sgd lr", self.lr, 0, low_open=True)

    def step(self, params: P.ParamsT, delta: P.ParamsT, state: Any) -> tuple[P.Params, Any]:
        return P.axpy(self.lr, delta, params), state


class AdaptiveServerOptimizer(ServerOptimizer):
    """The shared body of FedAdagrad, FedAdam and FedYogi (Reddi et al. 2021, Algorithm 2).

    With Δ_t the reducer's delta (the pseudo-gradient's negative, Δ_t = mean_k (w_k - w_t)):

        m_t     = β1 m_{t-1} + (1 - β1) Δ_t
        v_t     = `second_moment(v_{t-1}, Δ_t²)`           (the one line the three differ in)
        w_{t+1} = w_t + η m_t / (√v_t + τ)                 (elementwise; no bias correction)

    Choices: m and v start at zero (as Flower does; the paper asks v_{-1} ≥ τ², which only changes
    the first rounds' scale), so m_{-1} = v_{-1} = 0. The rule moves floating entries only; an
    integer entry (batch norm's num_batches_tracked) has no gradient scale and moves by the plain,
    rounded delta, w + round(Δ). The state is {"m": {name: tensor}, "v": {name: tensor}} over the
    floating entries, in their dtype, and is checkpointed with the server.
    """

    lr: float
    beta1: float
    tau: float

    def __post_init__(self) -> None:
        check_number(f"{self.name} lr", self.lr, 0, low_open=True)
        check_number(f"{self.name} beta1", self.beta1, 0, 1, high_open=True)
        check_number(f"{self.name} tau", self.tau, 0, low_open=True)  # τ > 0: no division by √0
        if hasattr(self, "beta2"):
            check_number(f"{self.name} beta2", self.beta2, 0, 1)

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t-1} and Δ_t² (a new tensor)."""
        raise NotImplementedError

    def init(self, params: P.ParamsT) -> dict:
        floating = [k for k, v in params.items() if v.is_floating_point()]
        return {"m": {k: torch.zeros_like(params[k]) for k in floating},
                "v": {k: torch.zeros_like(params[k]) for k in floating}}

    def step(self, params: P.ParamsT, delta: P.ParamsT, state: dict) -> tuple[P.Params, dict]:
        new, m_new, v_new = OrderedDict(), {}, {}
        for k, w in params.items():
            d = delta[k]
            if not w.is_floating_point():
                new[k] = (w + d).round().to(w.dtype) if d.is_floating_point() else w + d.to(w.dtype)
                continue
            m = state["m"][k] * self.beta1 + d * (1 - self.beta1)
            v = self.second_moment(state["v"][k], d * d)
            new[k] = w + self.lr * m / (v.sqrt() + self.tau)
            m_new[k], v_new[k] = m, v
        return new, {"m": m_new, "v": v_new}


@STEPS.register()
@dataclass
class FedAdagrad(AdaptiveServerOptimizer):
    """FedAdagrad (Reddi et al. 2021, Algorithm 2): v_t = v_{t-1} + Δ_t².

    Args:
      lr: the server learning rate η (default 0.01, Flower's FedYogi default, shared by all three).
      beta1: the momentum β1 in [0, 1) (default 0.9).
      tau: the adaptivity τ > 0 (default 1e-3; Reddi et al. tune η and τ per task).
    FedAdagrad has no β2: its v only accumulates.
    """

    name: ClassVar[str] = "fedadagrad"

    lr: float = 0.01
    beta1: float = 0.9
    tau: float = 1e-3

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2


@STEPS.register()
@dataclass
class FedAdam(AdaptiveServerOptimizer):
    """FedAdam (Reddi et al. 2021, Algorithm 2): v_t = β2 v_{t-1} + (1 - β2) Δ_t².

    Args: lr (η, default 0.01), beta1 (β1 in [0, 1), 0.9), beta2 (β2 in [0, 1], 0.99), tau (τ > 0,
    1e-3): Flower's FedYogi defaults. β2 = 1 keeps v at its start, 0, so with β1 = 0, τ = 1 and
    η = 1 the step is w + Δ_t, FedAvg's.
    """

    name: ClassVar[str] = "fedadam"

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v * self.beta2 + d2 * (1 - self.beta2)


@STEPS.register()
@dataclass
class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021, Algorithm 2): v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²).

    Args: those of FedAdam. sign(0) = 0, so where v_{t-1} = Δ_t², v stays put. v stays >= 0: it
    falls, by (1 - β2) Δ_t², only where v_{t-1} > Δ_t².
    """

    name: ClassVar[str] = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)
