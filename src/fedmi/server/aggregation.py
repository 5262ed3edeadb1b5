"""Aggregation as a chain of small steps: `weighted_mean() | server_sgd(lr=1.0)`.

A pipeline is zero or more update transforms (each maps the list of updates to a new list:
clipping, noise, ...), then one reducer (many updates -> one delta: weighted mean, median, ...),
then one server optimiser (params, delta -> new params: SGD, Adam, ...). A missing optimiser
means server_sgd(lr=1.0), i.e. w <- w + delta. Each survey method is then one pipeline line.

Server memory: a streaming reducer (the means) folds each update into a running sum as it
arrives, so a round holds one accumulator and one update, O(model) however many sites report.
A reducer that needs every update at once (median, Krum) and any update transform declare it
(`needs_all_updates`); the round then buffers the updates, O(sites x model).
"""

from __future__ import annotations

import ast
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch

from fedmi.core import params as P
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError, check_number


class Step:
    """Base of all aggregation steps; `a | b` chains them into a pipeline."""

    name: ClassVar[str]  # the name a pipeline text uses

    def __or__(self, other: "Step") -> "AggregationPipeline":
        return AggregationPipeline([self]) | other


class UpdateTransform(Step):
    needs_all_updates: ClassVar[bool] = True  # a transform sees the round's whole list

    def transform(self, updates: list[Update], state: Any, round_info: RoundInfo) -> list[Update]:
        raise NotImplementedError


class Reducer(Step):
    """Many updates -> one delta.

    A streaming reducer implements start / fold / finish and keeps O(model) state; one that
    needs all updates together sets `needs_all_updates` and overrides `reduce`.
    """

    needs_all_updates: ClassVar[bool] = False

    def start(self, like: P.ParamsT) -> Any:
        raise NotImplementedError

    def fold(self, acc: Any, update: Update) -> Any:
        raise NotImplementedError

    def finish(self, acc: Any, like: P.ParamsT) -> P.Params:
        raise NotImplementedError

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        acc = self.start(like)
        for u in updates:
            acc = self.fold(acc, u)
        return self.finish(acc, like)


class ServerOptimizer(Step):
    def init(self, params: P.ParamsT) -> Any:
        return None

    def step(self, params: P.ParamsT, delta: P.ParamsT, state: Any) -> tuple[P.Params, Any]:
        raise NotImplementedError


class _RunningSum:
    """sum_k w_k * delta_k and sum_k w_k, folded in place: one model's memory.

    Floating tensors accumulate in their own dtype; integer ones (batch norm's step counter)
    in float64, rounded back at the end.
    """

    def __init__(self, like: P.ParamsT):
        self.like = like
        self.total = OrderedDict(
            (k, torch.zeros_like(v, dtype=v.dtype if v.is_floating_point() else torch.float64))
            for k, v in like.items())
        self.weight = 0.0

    def add(self, weight: float, delta: P.ParamsT) -> "_RunningSum":
        for k, v in self.total.items():
            v.add_(delta[k], alpha=weight)
        self.weight += weight
        return self

    def mean(self) -> P.Params:
        if self.weight <= 0:
            raise ValueError("mean of no updates")
        for k, v in self.total.items():
            v.div_(self.weight)
            if v.dtype != self.like[k].dtype:
                self.total[k] = v.round().to(self.like[k].dtype)
        return self.total


@dataclass
class WeightedMean(Reducer):
    """FedAvg's aggregate: delta = sum_k (n_k / n) delta_k, n = sum_k n_k (McMahan et al. 2017).

    Folds n_k * delta_k into a running sum as updates arrive and divides by n at the end.
    """

    name: ClassVar[str] = "weighted_mean"

    def start(self, like: P.ParamsT) -> _RunningSum:
        return _RunningSum(like)

    def fold(self, acc: _RunningSum, update: Update) -> _RunningSum:
        return acc.add(float(update.num_examples), update.delta)

    def finish(self, acc: _RunningSum, like: P.ParamsT) -> P.Params:
        return acc.mean()


@dataclass
class Mean(WeightedMean):
    """Unweighted mean of the sites' deltas: every site counts the same."""

    name: ClassVar[str] = "mean"

    def fold(self, acc: _RunningSum, update: Update) -> _RunningSum:
        return acc.add(1.0, update.delta)


def _column_blocks(updates: Sequence[Update], like: P.ParamsT, max_elements: int = 1 << 22
                   ) -> Iterable[tuple[str, slice, torch.Tensor]]:
    """(name, columns, columns x K matrix of the updates' values) for blocks of each tensor.

    Stacking block by block keeps the working set to about `max_elements` beyond the updates.
    """
    width = max(1, max_elements // len(updates))
    for k, ref in like.items():
        n = ref.numel()
        for start in range(0, n, width):
            cols = slice(start, min(n, start + width))
            yield k, cols, torch.stack([u.delta[k].reshape(-1)[cols] for u in updates], dim=1)


@dataclass
class CoordinateMedian(Reducer):
    """Coordinate-wise median of the deltas (Yin et al. 2018), robust to a minority of bad sites.

    delta[j] = median_k delta_k[j]; with an even number of sites, the mean of the two middle values.
    """

    name: ClassVar[str] = "median"
    needs_all_updates: ClassVar[bool] = True

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        out = P.zeros_like(like)
        lo, hi = (len(updates) - 1) // 2, len(updates) // 2
        for k, cols, block in _column_blocks(updates, like):
            ordered = block.sort(dim=1).values
            out[k].view(-1)[cols] = (ordered[:, lo] + ordered[:, hi]) / 2
        return out


@dataclass
class Krum(Reducer):
    """Krum (Blanchard et al. 2017): the update closest to its neighbours, tolerating f bad sites.

    score(i) = sum of ||delta_i - delta_j||^2 over the K - f - 2 nearest other updates j; the
    result is the update with the lowest score, or with m > 1 (Multi-Krum) the mean of the m
    lowest-scoring updates. Needs K >= 2f + 3 updates.
    """

    name: ClassVar[str] = "krum"
    needs_all_updates: ClassVar[bool] = True

    f: int = 1
    m: int = 1

    def __post_init__(self) -> None:
        for what, value, low in (("f", self.f, 0), ("m", self.m, 1)):
            if not isinstance(value, int) or value < low:
                raise FedmiError(f"krum {what} must be an integer of at least {low}, got {value!r}")

    def scores(self, updates: Sequence[Update], like: P.ParamsT) -> torch.Tensor:
        k = len(updates)
        if k < 2 * self.f + 3:
            raise FedmiError(f"krum with f={self.f} needs at least {2 * self.f + 3} updates, got {k}")
        gram = torch.zeros(k, k, dtype=torch.float64)
        for _, _, block in _column_blocks(updates, like):
            block = block.to(torch.float64)
            gram += block.T @ block
        sq = gram.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
        dist.fill_diagonal_(math.inf)
        return dist.sort(dim=1).values[:, : k - self.f - 2].sum(dim=1)

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        chosen = self.scores(updates, like).argsort()[: self.m].tolist()
        return Mean().reduce([updates[i] for i in chosen], like)


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

    @property
    def needs_all_updates(self) -> bool:
        transforms, reducer, _ = self._parts()
        return bool(transforms) or reducer.needs_all_updates

    def init(self, params: P.ParamsT) -> dict[str, Any]:
        _, _, opt = self._parts()
        return {"optimizer": opt.init(params)}

    def begin_round(self, state: dict[str, Any], params: P.ParamsT, round_info: RoundInfo) -> "RoundAggregation":
        """Open a round: `add` each accepted update as it arrives, then `finish`."""
        return RoundAggregation(self, state, params, round_info)

    def aggregate(self, state: dict[str, Any], params: P.ParamsT, updates: Iterable[Update],
                  round_info: RoundInfo) -> tuple[P.Params, dict[str, Any]]:
        round_ = self.begin_round(state, params, round_info)
        for u in updates:
            round_.add(u)
            del u  # released before the next one arrives
        return round_.finish()

    def __str__(self) -> str:
        return " | ".join(_describe(s) for s in self.steps)


class RoundAggregation:
    """One round's aggregation: streams updates into the reducer, or buffers them when a step
    needs the whole list."""

    def __init__(self, pipeline: AggregationPipeline, state: dict[str, Any], params: P.ParamsT,
                 round_info: RoundInfo):
        self._transforms, self._reducer, self._optimizer = pipeline._parts()
        self._state, self._params, self._info = state, params, round_info
        needs_all = pipeline.needs_all_updates
        self._buffer: list[Update] | None = [] if needs_all else None
        self._acc = None if needs_all else self._reducer.start(params)
        self.count = 0

    def add(self, update: Update) -> None:
        if self._buffer is not None:
            self._buffer.append(update)
        else:
            self._acc = self._reducer.fold(self._acc, update)
        self.count += 1

    def finish(self) -> tuple[P.Params, dict[str, Any]]:
        """The new global parameters and server state (the parameters unchanged if nothing came)."""
        delta = None
        if self._buffer is not None:
            updates, self._buffer = self._buffer, None
            for t in self._transforms:
                updates = t.transform(updates, self._state, self._info)
            if updates:
                delta = self._reducer.reduce(updates, self._params)
            del updates  # the round's buffer goes before the optimiser allocates
        elif self.count:
            delta, self._acc = self._reducer.finish(self._acc, self._params), None
        if delta is None:
            return P.clone(self._params), self._state
        new_params, self._state["optimizer"] = self._optimizer.step(self._params, delta, self._state["optimizer"])
        return new_params, self._state


def _describe(step: Step) -> str:
    args = ", ".join(f"{k}={v}" for k, v in vars(step).items())
    return f"{step.name}({args})"


# The names pipelines are written with, in code (`weighted_mean() | server_sgd(0.5)`) and in text.
weighted_mean, mean, median, krum, server_sgd = WeightedMean, Mean, CoordinateMedian, Krum, ServerSGD
STEPS: dict[str, type[Step]] = {cls.name: cls for cls in (WeightedMean, Mean, CoordinateMedian, Krum, ServerSGD)}
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
