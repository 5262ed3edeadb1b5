"""Aggregation as a chain of small steps: `weighted_mean() | server_sgd(lr=1.0)`.

A pipeline is zero or more update transforms (each maps the list of updates to a new list:
clipping, noise, ...), then one reducer (many updates -> one delta: weighted mean, median, ...),
then one server optimiser (params, delta -> new params: SGD, Adam, ...). A missing optimiser
means server_sgd(lr=1.0), i.e. w <- w + delta. Each survey method is then one pipeline line.
"""

from __future__ import annotations

import ast
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from fedmi.core import params as P
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError, check_number


class Step:
    """Base of all aggregation steps; `a | b` chains them into a pipeline."""

    name: ClassVar[str]  # the name a pipeline text uses

    def __or__(self, other: "Step") -> "AggregationPipeline":
        return AggregationPipeline([self]) | other


class UpdateTransform(Step):
    def transform(self, updates: list[Update], state: Any, round_info: RoundInfo) -> list[Update]:
        raise NotImplementedError


class Reducer(Step):
    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        raise NotImplementedError


class ServerOptimizer(Step):
    def init(self, params: P.ParamsT) -> Any:
        return None

    def step(self, params: P.ParamsT, delta: P.ParamsT, state: Any) -> tuple[P.Params, Any]:
        raise NotImplementedError


def _cast_like(total: P.ParamsT, like: P.ParamsT) -> P.Params:
    return OrderedDict((k, total[k].to(like[k].dtype)) for k in like)


@dataclass
class WeightedMean(Reducer):
    """FedAvg's aggregate: delta = sum_k (n_k / n) delta_k, n = sum_k n_k (McMahan et al. 2017).

    Accumulates in float64 so the result does not depend on the order sites arrive in beyond
    rounding of the final cast.
    """

    name: ClassVar[str] = "weighted_mean"

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        n = sum(u.num_examples for u in updates)
        return _cast_like(P.weighted_sum((u.num_examples / n, u.delta) for u in updates), like)


@dataclass
class Mean(Reducer):
    """Unweighted mean of the sites' deltas: every site counts the same."""

    name: ClassVar[str] = "mean"

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        return _cast_like(P.weighted_sum((1.0 / len(updates), u.delta) for u in updates), like)


@dataclass
class ServerSGD(ServerOptimizer):
    """w <- w + lr * delta. lr = 1 applies FedAvg's average as is; FedSGD's step size is lr."""

    name: ClassVar[str] = "server_sgd"

    lr: float = 1.0

    def __post_init__(self) -> None:
        check_number("server_sgd lr", self.lr, 0, low_open=True)

    def step(self, params: P.ParamsT, delta: P.ParamsT, state: Any) -> tuple[P.Params, Any]:
        return P.axpy(self.lr, delta, params), state


@dataclass
class AggregationPipeline:
    steps: list[Step] = field(default_factory=list)

    def __or__(self, other: Step | "AggregationPipeline") -> "AggregationPipeline":
        more = other.steps if isinstance(other, AggregationPipeline) else [other]
        return AggregationPipeline([*self.steps, *more])

    def _parts(self) -> tuple[list[UpdateTransform], Reducer, ServerOptimizer]:
        transforms, reducers, optimisers = [], [], []
        for s in self.steps:
            if isinstance(s, UpdateTransform):
                if reducers:
                    raise FedmiError(f"aggregation: update transform {s} must come before the reducer")
                transforms.append(s)
            elif isinstance(s, Reducer):
                reducers.append(s)
            elif isinstance(s, ServerOptimizer):
                optimisers.append(s)
            else:
                raise FedmiError(f"aggregation: {s!r} is not an aggregation step")
        if len(reducers) != 1 or len(optimisers) > 1:
            raise FedmiError("aggregation: a pipeline needs exactly one reducer and at most one server optimiser, "
                             f"got {self}")
        return transforms, reducers[0], optimisers[0] if optimisers else ServerSGD(1.0)

    def init(self, params: P.ParamsT) -> dict[str, Any]:
        _, _, opt = self._parts()
        return {"optimizer": opt.init(params)}

    def aggregate(self, state: dict[str, Any], params: P.ParamsT, updates: list[Update],
                  round_info: RoundInfo) -> tuple[P.Params, dict[str, Any]]:
        transforms, reducer, opt = self._parts()
        for t in transforms:
            updates = t.transform(updates, state, round_info)
        if not updates:
            return P.clone(params), state
        delta = reducer.reduce(updates, params)
        new_params, state["optimizer"] = opt.step(params, delta, state["optimizer"])
        return new_params, state

    def __str__(self) -> str:
        return " | ".join(_describe(s) for s in self.steps)


def _describe(step: Step) -> str:
    args = ", ".join(f"{k}={v}" for k, v in vars(step).items())
    return f"{step.name}({args})"


# The names pipelines are written with, in code (`weighted_mean() | server_sgd(0.5)`) and in text.
weighted_mean, mean, server_sgd = WeightedMean, Mean, ServerSGD
STEPS: dict[str, type[Step]] = {cls.name: cls for cls in (WeightedMean, Mean, ServerSGD)}
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
            steps.append(STEPS[m.group(1)](**kwargs))
        except TypeError as e:
            raise FedmiError(f"aggregation: {m.group(1)}: {e}") from None
    pipeline = AggregationPipeline(steps)
    pipeline._parts()  # validate the shape now, not in the first round
    return pipeline


def make_aggregator(method: str, server_lr: float = 1.0) -> AggregationPipeline:
    """The aggregation of a named method, or a pipeline text.

    FedAvg, FedProx and FedSGD all take the sample-weighted mean of the sites' deltas; they
    differ in what a delta is (local progress, or the negative gradient) and in the server's
    step size (1 for FedAvg/FedProx, FedSGD's learning rate for FedSGD).
    """
    if method in ("fedavg", "fedprox", "fedsgd"):
        return weighted_mean() | server_sgd(server_lr)
    return parse_pipeline(method)
