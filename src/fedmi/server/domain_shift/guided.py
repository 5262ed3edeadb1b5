"""Guided-gradient aggregation (Fan et al., survey ref. [78], federated autism spectrum disorder
classification): after aggregating the sites' updates, only the coordinates whose aggregated
gradient has the kept sign update the global model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedmi.core import params as P
from fedmi.errors import FedmiError
from fedmi.server.base import STEPS
from fedmi.server.reducers import RunningSum, WeightedMean

KEEPS = ("positive_gradient", "negative_gradient")


@STEPS.register()
@dataclass
class Guided(WeightedMean):
    """delta[j] = mean[j] if the sign of g[j] = -mean[j] is the kept one, else 0.

    mean = sum_k (n_k / n) delta_k (FedAvg's weighted mean) and g = -mean the aggregated
    pseudo-gradient (delta_k = w_k - w_t, so a parameter the sites lowered has g > 0). Fan et al.
    use "only positive values" of the aggregate; fedmi reads that as the aggregated gradient:

      keep="positive_gradient" (default): keep coordinates with g > 0, i.e. mean < 0;
      keep="negative_gradient": keep coordinates with g < 0, i.e. mean > 0.

    A coordinate with mean exactly 0 is 0 either way. Integer entries (num_batches_tracked) are
    counters, not weights: they pass as the (rounded) mean, unmasked.

    Streaming: WeightedMean's O(model) running sum, masked at the end.
    """

    name: ClassVar[str] = "guided"

    keep: str = "positive_gradient"

    def __post_init__(self) -> None:
        if self.keep not in KEEPS:
            raise FedmiError(f"guided keep must be one of {', '.join(KEEPS)}, got {self.keep!r}")

    def finish(self, acc: RunningSum, like: P.ParamsT) -> P.Params:
        out = acc.mean()
        for k, v in out.items():
            if v.is_floating_point():
                kept = v < 0 if self.keep == "positive_gradient" else v > 0
                out[k] = torch.where(kept, v, torch.zeros_like(v))
        return out
