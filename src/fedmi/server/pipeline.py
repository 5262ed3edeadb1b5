"""The aggregation pipeline: update transforms, one reducer, one server optimiser, each with its own state.

`weighted_mean() | server_sgd(lr=1.0)` in code, `"weighted_mean | server_sgd(lr=1.0)"` in a config.
A missing optimiser means server_sgd(lr=1.0), i.e. w <- w + delta; a missing reducer means
weighted_mean (so "fedadam(lr=0.01)" alone is FedAdam over FedAvg's mean). The pipeline's state is a
tuple with one entry per step (transforms, reducer, optimiser), so each step reads and writes
only its own.

Server memory: with a streaming reducer and no transform, a round folds each update into an O(model)
accumulator as it arrives. A step that needs every update at once (median, Krum, any transform)
makes the round buffer them, O(sites x model), and says so (`needs_all_updates`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Iterable

from fedmi.core import params as P
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.server.base import STEPS, Reducer, ServerOptimizer, Step, UpdateTransform
from fedmi.server.optimizers import ServerSGD


@dataclass
class AggregationPipeline:
    steps: list[Step] = field(default_factory=list)

    def __or__(self, other: Step | "AggregationPipeline") -> "AggregationPipeline":
        more = other.steps if isinstance(other, AggregationPipeline) else [other]
        return AggregationPipeline([*self.steps, *more])

    def parts(self) -> tuple[list[UpdateTransform], Reducer, ServerOptimizer]:
        """(transforms, reducer, optimiser), checked: transforms first, one reducer, at most one optimiser."""
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
        if len(reducers) > 1 or len(optimisers) > 1 or not (reducers or optimisers):
            raise FedmiError("aggregation: a pipeline needs at most one reducer and at most one server optimiser, "
                             f"and one of the two; got {self}")
        if not reducers:
            from fedmi.server.reducers import WeightedMean

            reducers = [WeightedMean()]
        return transforms, reducers[0], optimisers[0] if optimisers else ServerSGD(1.0)

    def _all_steps(self) -> list[Step]:
        transforms, reducer, optimiser = self.parts()
        return [*transforms, reducer, optimiser]

    @property
    def needs_all_updates(self) -> bool:
        transforms, reducer, _ = self.parts()
        return bool(transforms) or reducer.needs_all_updates

    def releases_empty(self) -> bool:
        """Whether a round with no update is defined: its reducer releases one anyway (a private sum)."""
        return self.parts()[1].releases_empty

    def min_updates(self) -> int:
        """The fewest updates a round needs: the most any step needs."""
        return max(s.min_updates() for s in self._all_steps())

    def init(self, params: P.ParamsT) -> tuple:
        """The pipeline's state: one entry per step (transforms, reducer, optimiser)."""
        return tuple(s.init(params) for s in self._all_steps())

    def broadcast(self, state: tuple) -> dict:
        """What the sites receive with the parameters: every step's `broadcast`, merged."""
        out: dict = {}
        for step, step_state in zip(self._all_steps(), state):
            out.update(step.broadcast(step_state))
        return out

    def report(self, state: tuple) -> dict:
        """What each round's record carries of the steps' state: every step's `report`, merged."""
        out: dict = {}
        for step, step_state in zip(self._all_steps(), state):
            out.update(step.report(step_state))
        return out

    def begin_round(self, state: tuple, params: P.ParamsT, round_info: RoundInfo) -> "RoundAggregation":
        """Open a round: `add` each accepted update as it arrives, then `finish`."""
        return RoundAggregation(self, state, params, round_info)

    def aggregate(self, state: tuple, params: P.ParamsT, updates: Iterable[Update],
                  round_info: RoundInfo) -> tuple[P.Params, tuple]:
        round_ = self.begin_round(state, params, round_info)
        for u in updates:
            round_.add(u)
            del u  # released before the next one arrives
        return round_.finish()

    def __str__(self) -> str:
        return " | ".join(str(s) for s in self.steps)


class RoundAggregation:
    """One round's aggregation: streams updates into the reducer, or buffers them when a step
    needs the whole list."""

    def __init__(self, pipeline: AggregationPipeline, state: tuple, params: P.ParamsT, round_info: RoundInfo):
        self._transforms, self._reducer, self._optimizer = pipeline.parts()
        if len(state) != len(self._transforms) + 2:
            raise FedmiError(f"aggregation: the state has {len(state)} entries, the pipeline {pipeline} "
                             f"has {len(self._transforms) + 2} steps (a checkpoint of another pipeline?)")
        self._state, self._params, self._info = list(state), params, round_info
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

    def finish(self) -> tuple[P.Params, tuple]:
        """The new global parameters and pipeline state (the parameters unchanged if nothing came)."""
        delta, r = None, len(self._transforms)  # the reducer's entry in the state
        if self._buffer is not None:
            updates, self._buffer = self._buffer, None
            for i, t in enumerate(self._transforms):
                updates, self._state[i] = t.transform(updates, self._state[i], self._info)
            if updates or self._reducer.releases_empty:
                delta, self._state[r] = self._reducer.reduce_round(updates, self._params, self._state[r], self._info)
            del updates  # the round's buffer goes before the optimiser allocates
        elif self.count or self._reducer.releases_empty:
            delta, self._state[r] = self._reducer.finish_round(self._acc, self._params, self._state[r], self._info)
            self._acc = None
        if delta is None:
            return P.clone(self._params), tuple(self._state)
        new_params, self._state[-1] = self._optimizer.step(self._params, delta, self._state[-1])
        return new_params, tuple(self._state)


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
            steps.append(STEPS.get(m.group(1))(**kwargs))
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
        from fedmi.server.reducers import WeightedMean

        return WeightedMean() | ServerSGD(server_lr)
    return parse_pipeline(text)
