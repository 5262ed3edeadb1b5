"""Aggregation pipelines as configs write them: `"weighted_mean | server_sgd(lr=1.0)"`, and the
default aggregation of a local method. The chain itself (`AggregationPipeline`) is defined beside
the steps, in `fedmi.server.base`.
"""

from __future__ import annotations

import ast
import re

from fedmi.errors import FedmiError
from fedmi.server.base import STEPS, AggregationPipeline, RoundAggregation, Step
from fedmi.server.optimizers import ServerSGD
from fedmi.server.reducers import WeightedMean

__all__ = ["AggregationPipeline", "RoundAggregation", "make_aggregator", "parse_pipeline"]


_STEP_RE = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)


def parse_pipeline(text: str) -> AggregationPipeline:
    """Parse `"weighted_mean | server_sgd(lr=0.5)"` into a pipeline (keyword literals only)."""
    steps: list[Step] = []
    for part in text.split("|"):
        m = _STEP_RE.match(part)
        if not m or m.group(1) not in STEPS:
            raise FedmiError(f"aggregation: unknown step '{part.strip()}'; steps: {', '.join(STEPS)}")
        kwargs = {}
        if m.group(2) and m.group(2).strip():
            unreadable = FedmiError(f"aggregation: cannot read the arguments of '{part.strip()}' "
                                    "(use name=value literals)")
            try:
                call = ast.parse(f"f({m.group(2)})", mode="eval").body
                if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
                    raise unreadable
                kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            except (SyntaxError, ValueError):
                raise unreadable from None
        try:
            built = STEPS.get(m.group(1))(**kwargs)
            steps += built.steps if isinstance(built, AggregationPipeline) else [built]  # dp_mean is three
        except TypeError as e:
            raise FedmiError(f"aggregation: {m.group(1)}: {e}") from None
    pipeline = AggregationPipeline(steps)
    pipeline.parts()  # validate the shape now, not in the first round
    return pipeline


def make_aggregator(text: str | None = None, server_lr: float = 1.0, method: object = None) -> AggregationPipeline:
    """A pipeline text, or (None, or a method name such as "fedavg") the default aggregation.

    The default is the local method's own reducer where it declares one (`default_aggregator`:
    SCAFFOLD's control variates need the `scaffold` step), else FedAvg's sample-weighted mean, with a
    server step of `server_lr` (1 for FedAvg and FedProx, FedSGD's learning rate for FedSGD). FedAvg,
    FedProx and FedSGD differ in what a delta is (local progress, or the negative gradient), not in this.
    """
    own = getattr(method, "default_aggregator", None)
    if text is None and own:
        return parse_pipeline(own) | ServerSGD(server_lr)
    if text is None or text in ("fedavg", "fedprox", "fedsgd"):
        return WeightedMean() | ServerSGD(server_lr)
    return parse_pipeline(text)
