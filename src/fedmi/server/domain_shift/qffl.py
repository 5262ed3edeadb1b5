"""q-FFL (q-fair federated learning) in its q-FedAvg form: Li, Sanjabi, Beirami, Smith, "Fair
Resource Allocation in Federated Learning" (ICLR 2020), the method the survey's Hosseini et al.
(ref. [77]) use to treat sites fairly. Sites with a higher loss at the global model pull harder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.errors import FedmiError, check_number
from fedmi.server.base import STEPS, Reducer, site_metric
from fedmi.server.reducers import RunningSum

LOSS_FLOOR = 1e-10  # F_k^(q-1) with q < 1 needs F_k > 0


class _QFFLSum:
    """sum_k n_k F_k^q delta_k (a RunningSum) and sum_k n_k h_k / L."""

    def __init__(self, like: P.ParamsT):
        self.sum, self.h = RunningSum(like), 0.0


@STEPS.register()
@dataclass
class QFFL(Reducer):
    """q-FedAvg's server step (Li et al. 2020, Algorithm 3), written for deltas delta_k = w_k - w_t.

    With L the Lipschitz constant of the loss's gradient (the paper sets L = 1 / the sites' local
    learning rate), F_k = max(metrics["start_loss"], 1e-10) the site's loss at w_t and
    p_k = n_k / n, the paper's Δw_k = L (w_t - w_k) = -L delta_k gives

        h_k     = q F_k^(q-1) ||L delta_k||^2 + L F_k^q
        w_{t+1} = w_t + (sum_k p_k F_k^q L delta_k) / (sum_k p_k h_k)

    which this reducer returns as the delta w_{t+1} - w_t (follow it with server_sgd(lr=1), the
    default). It is computed with L divided out of both sums:
    (sum_k n_k F_k^q delta_k) / (sum_k n_k (q F_k^(q-1) L ||delta_k||^2 + F_k^q)).

    Choices: the p_k weighting is the full-participation form; the paper samples sites with
    probability p_k and averages the sampled ones uniformly (the same in expectation). q = 0 gives
    h_k = L and FedAvg's weighted mean sum_k p_k delta_k exactly. ||delta_k|| is over the floating
    entries of the delta (an integer counter such as num_batches_tracked is not a weight), and
    includes any floating buffers the model has (batch norm's running statistics). F_k comes from
    the update's metrics["start_loss"], the loss of the site's first batch at w_t: the exact F_k(w_t)
    only with full-batch local steps, an unbiased one-batch estimate otherwise.

    Streaming: each update folds into one weighted O(model) sum and one scalar.

    Args:
      q: the fairness exponent, q >= 0 (default 1.0; 0 is FedAvg).
      lipschitz: L > 0, required (typically 1 / the local learning rate).
    """

    name: ClassVar[str] = "qffl"

    q: float = 1.0
    lipschitz: float | None = None

    def __post_init__(self) -> None:
        check_number("qffl q", self.q, 0)
        if self.lipschitz is None:
            raise FedmiError("qffl needs lipschitz=L, the Lipschitz constant of the loss's gradient "
                             "(q-FedAvg sets L = 1 / the sites' local learning rate)")
        check_number("qffl lipschitz", self.lipschitz, 0, low_open=True)

    def start(self, like: P.ParamsT) -> _QFFLSum:
        return _QFFLSum(like)

    def fold(self, acc: _QFFLSum, update: Update) -> _QFFLSum:
        loss = site_metric(update, "start_loss", self.name, "its loss at the global parameters")
        if loss < 0:
            raise FedmiError(f"qffl: the update from site {update.site} has start_loss {loss!r}; it must be >= 0")
        f, n = max(float(loss), LOSS_FLOOR), float(update.num_examples)
        sq_norm = sum(float((v.double() ** 2).sum()) for v in update.delta.values() if v.is_floating_point())
        f_q = f ** self.q
        # q = 0: f_q = 1 and curvature = 0 exactly, so the fold is FedAvg's (weight n) bit for bit.
        curvature = self.q * f ** (self.q - 1) * self.lipschitz * sq_norm
        acc.sum.add(n * f_q, update.delta)
        acc.h += n * (curvature + f_q)
        return acc

    def finish(self, acc: _QFFLSum, like: P.ParamsT) -> P.Params:
        # RunningSum.mean divides by its weight (and rounds integer entries): the q-FFL denominator.
        acc.sum.weight = acc.h
        return acc.sum.mean()
