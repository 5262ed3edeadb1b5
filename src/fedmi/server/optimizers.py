"""Server optimisers: how the round's aggregated delta moves the global parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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
