"""Aggregation steps (server end, survey §V): the extension points and their chain, in the shape of optax.

A pipeline chains zero or more update transforms, one reducer, zero or more delta transforms and at
most one server optimiser: `norm_bound(max_norm=1) | mean | gaussian_noise(...) | server_sgd(lr=1.0)`.
Every step has its own state, made by its `init` and threaded through the rounds by the chain (a
tuple with one entry per step, as optax's `chain` keeps), so the server's checkpoint holds each
step's state separately.

- `UpdateTransform`: acts on the sites' updates before the reducer. A streaming one maps each update
  as it arrives (`map_update`: clipping), in O(model) memory; one that needs the round's whole list
  (a bound from the round's median norm) sets `needs_all_updates` and overrides `transform`.
- `Reducer`: many updates -> one delta. A streaming reducer folds each update into an O(model)
  accumulator as it arrives (`start` / `fold` / `finish`); one that needs every update at once sets
  `needs_all_updates` and overrides `reduce`. One with state or round-dependent behaviour overrides
  `finish_round` / `reduce_round`.
- `DeltaTransform`: the reducer's delta -> a new delta (the Gaussian noise of a private sum).
- `ServerOptimizer`: (params, delta) -> new params (SGD, and adaptive ones such as Adam).

Any step may `broadcast` tensors from its state to the sites with the next round's parameters, and
`report` figures of it in each round's record. Steps register themselves in `STEPS` under the name
pipeline texts use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch

from fedmi.core import params as P
from fedmi.core.registry import Registry
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError


class Step:
    """Base of all aggregation steps; `a | b` chains steps into a pipeline.

    Class attributes:
      name: the name pipeline texts use (`"weighted_mean"`).
    """

    name: ClassVar[str]

    def init(self, params: P.ParamsT) -> Any:
        """This step's state before the first round (default: none).

        Args:
          params: the initial global parameters (for a state shaped like the model).
        Returns:
          Any nest of dicts, lists, tuples, tensors, numbers and strings (it is checkpointed).
        """
        return None

    def broadcast(self, state: Any) -> dict[str, torch.Tensor]:
        """Tensors every site receives with the next round's parameters (`RoundInfo.extras`).

        Args:
          state: this step's state.
        Returns:
          Name -> tensor (default: nothing). SCAFFOLD's server control variate, say.
        """
        return {}

    def report(self, state: Any) -> dict[str, float]:
        """Figures of this step's state that each round's record carries (default: none).

        Args:
          state: this step's state after the round.
        Returns:
          Name -> number, e.g. {"epsilon": 1.2, "delta": 1e-5} (the privacy budget spent so far).
        """
        return {}

    def min_updates(self) -> int:
        """The fewest updates a round needs for this step to be defined (Krum: 2f + 3).

        The runner checks it against the sites selected per round before the first round.
        """
        return 1

    def __or__(self, other: "Step | AggregationPipeline") -> "AggregationPipeline":
        return AggregationPipeline([self]) | other

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}({args})"


class UpdateTransform(Step):
    """Acts on the sites' updates before the reducer.

    A streaming transform sets `needs_all_updates = False` and maps each update as it arrives
    (`map_update`), so the round still holds one accumulator and one update. One that needs the
    round's whole list (a bound from the round's median norm) overrides `transform`.

    Example (scale every update by one half, streaming):

        @STEPS.register()
        class Halve(UpdateTransform):
            name = "halve"
            needs_all_updates = False
            def map_update(self, update, state, round_info):
                return replace(update, delta=P.scale(update.delta, 0.5)), state
    """

    needs_all_updates: ClassVar[bool] = True  # False for a transform that maps one update at a time

    def map_update(self, update: Update, state: Any, round_info: RoundInfo) -> tuple[Update, Any]:
        """Args: one update, this step's state, the round. Returns: (the new update, the new state)."""
        raise NotImplementedError(f"{type(self).__name__} maps no single update: it needs the round's list")

    def transform(self, updates: list[Update], state: Any, round_info: RoundInfo) -> tuple[list[Update], Any]:
        """Args: the round's updates, this step's state, the round. Returns: (new updates, new state).
        By default each update through `map_update`."""
        out = []
        for u in updates:
            u, state = self.map_update(u, state, round_info)
            out.append(u)
        return out, state


class Reducer(Step):
    """Many updates -> one delta.

    A streaming reducer implements `start` / `fold` / `finish` over an O(model) accumulator; one
    that needs every update together sets `needs_all_updates` and overrides `reduce`.

    Example (the unweighted mean, streaming):

        class Mean(Reducer):
            name = "mean"
            def start(self, like): return (P.zeros_like(like), 0)
            def fold(self, acc, update): return (P.add(acc[0], update.delta), acc[1] + 1)
            def finish(self, acc, like): return P.scale(acc[0], 1 / acc[1])
    """

    needs_all_updates: ClassVar[bool] = False
    # True for a reducer whose round is defined with no update at all (a private sum releases its
    # noise whether or not a sampled site came): its finish runs on an empty accumulator.
    releases_empty: ClassVar[bool] = False

    def start(self, like: P.ParamsT) -> Any:
        """An empty accumulator shaped like the parameters `like`."""
        raise NotImplementedError

    def fold(self, acc: Any, update: Update) -> Any:
        """The accumulator with `update` folded in (it may change `acc` in place)."""
        raise NotImplementedError

    def finish(self, acc: Any, like: P.ParamsT) -> P.Params:
        """The round's delta from the accumulator."""
        raise NotImplementedError

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        """The round's delta from all its updates at once (used when the round buffers them)."""
        acc = self.start(like)
        for u in updates:
            acc = self.fold(acc, u)
        return self.finish(acc, like)

    # A reducer with state of its own (SCAFFOLD's control variate) or one that depends on the round
    # (a widening frequency band, an adaptive clipping bound) overrides these; they default to the
    # stateless forms above.
    def start_round(self, like: P.ParamsT, state: Any, round_info: RoundInfo) -> Any:
        """An empty accumulator for the round, which may hold what folding needs of the state."""
        return self.start(like)

    def finish_round(self, acc: Any, like: P.ParamsT, state: Any, round_info: RoundInfo) -> tuple[P.Params, Any]:
        """(the round's delta, this step's new state) from a streaming accumulator."""
        return self.finish(acc, like), state

    def reduce_round(self, updates: Sequence[Update], like: P.ParamsT, state: Any, round_info: RoundInfo
                     ) -> tuple[P.Params, Any]:
        """(the round's delta, this step's new state) from all the round's updates."""
        return self.reduce(updates, like), state


class DeltaTransform(Step):
    """Acts on the reducer's delta before the server optimiser (the noise of a private sum).

    Example (add a constant to every floating-point entry):

        @STEPS.register()
        class Shift(DeltaTransform):
            name = "shift"
            def transform_delta(self, delta, state, round_info):
                return P.Params((k, v + 1 if v.is_floating_point() else v) for k, v in delta.items()), state
    """

    def transform_delta(self, delta: P.Params, state: Any, round_info: RoundInfo) -> tuple[P.Params, Any]:
        """Args: the round's delta, this step's state, the round. Returns: (the new delta, the new state)."""
        raise NotImplementedError


class ServerOptimizer(Step):
    """Applies the round's delta to the global parameters.

    Example (server SGD, `w <- w + lr * delta`):

        class ServerSGD(ServerOptimizer):
            name = "server_sgd"
            def step(self, params, delta, state): return P.axpy(self.lr, delta, params), state
    """

    def step(self, params: P.ParamsT, delta: P.ParamsT, state: Any) -> tuple[P.Params, Any]:
        """Args: global parameters, the reducer's delta, this step's state. Returns: (new params, new state)."""
        raise NotImplementedError


def site_metric(update: Update, name: str, step: str, what: str = "") -> float:
    """A finite scalar the step needs from a site's metrics (its training loss, its step count).

    Args:
      update: the site's update.
      name: the metric's key ("train_loss", "start_loss", "local_steps").
      step: the step's name, for the message.
      what: what the metric is, for the message.
    Returns:
      The metric as a float.
    Raises:
      FedmiError naming the site when the metric is missing or not finite.
    """
    value = update.metrics.get(name)
    if value is None:
        raise FedmiError(f"{step}: the update from site {update.site} has no '{name}' metric" +
                         (f" ({what})" if what else ""))
    if not math.isfinite(value):
        raise FedmiError(f"{step}: the update from site {update.site} has {name} {value!r}")
    return float(value)


STEPS: Registry[type[Step]] = Registry("aggregation step")


@dataclass
class AggregationPipeline:
    """The chain of a round's aggregation steps: update transforms, one reducer, delta transforms, one
    server optimiser, each with its own entry of the state tuple.

    A missing optimiser means server_sgd(lr=1.0), i.e. w <- w + delta; a missing reducer means
    weighted_mean (so "fedadam(lr=0.01)" alone is FedAdam over FedAvg's mean).

    Server memory: with streaming transforms and a streaming reducer, a round maps and folds each
    update into an O(model) accumulator as it arrives. A step that needs every update at once (median,
    Krum, a bound from the round's median norm) makes the round buffer them, O(sites x model), and
    says so (`needs_all_updates`).

    Example: ``(NormBound(max_norm=1.0) | Mean() | ServerSGD(1.0)).aggregate(state, params, updates, info)``
    """

    steps: list[Step] = field(default_factory=list)

    def __or__(self, other: "Step | AggregationPipeline") -> "AggregationPipeline":
        more = other.steps if isinstance(other, AggregationPipeline) else [other]
        return AggregationPipeline([*self.steps, *more])

    def parts(self) -> tuple[list[UpdateTransform], Reducer, list[DeltaTransform], ServerOptimizer]:
        """(update transforms, reducer, delta transforms, optimiser), checked: in that order, one reducer
        and at most one optimiser, and one of the two."""
        order = (UpdateTransform, Reducer, DeltaTransform, ServerOptimizer)
        kinds: dict[type, list[Step]] = {k: [] for k in order}
        last = 0
        for s in self.steps:
            kind = next((k for k in order if isinstance(s, k)), None)
            if kind is None:
                raise FedmiError(f"aggregation: {s!r} is not an aggregation step")
            if order.index(kind) < last:
                what = ("update transforms", "reducer", "delta transforms", "server optimiser")[last]
                raise FedmiError(f"aggregation: {s} must come before the {what} "
                                 f"(the order: update transforms, reducer, delta transforms, optimiser); got {self}")
            last = order.index(kind)
            kinds[kind].append(s)
        reducers, optimisers = kinds[Reducer], kinds[ServerOptimizer]
        if len(reducers) > 1 or len(optimisers) > 1 or not (reducers or optimisers):
            raise FedmiError("aggregation: a pipeline needs at most one reducer and at most one server optimiser, "
                             f"and one of the two; got {self}")
        reducer = reducers[0] if reducers else STEPS.get("weighted_mean")()
        optimiser = optimisers[0] if optimisers else STEPS.get("server_sgd")(1.0)
        return kinds[UpdateTransform], reducer, kinds[DeltaTransform], optimiser

    def _all_steps(self) -> list[Step]:
        transforms, reducer, after, optimiser = self.parts()
        return [*transforms, reducer, *after, optimiser]

    @property
    def needs_all_updates(self) -> bool:
        transforms, reducer, _, _ = self.parts()
        return any(t.needs_all_updates for t in transforms) or reducer.needs_all_updates

    def releases_empty(self) -> bool:
        """Whether a round with no update is defined: its reducer releases one anyway (a private sum)."""
        return self.parts()[1].releases_empty

    def min_updates(self) -> int:
        """The fewest updates a round needs: the most any step needs."""
        return max(s.min_updates() for s in self._all_steps())

    def init(self, params: P.ParamsT) -> tuple:
        """The pipeline's state: one entry per step, in the chain's order."""
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
    """One round's aggregation: maps each update through the streaming transforms and folds it into the
    reducer as it arrives, or buffers the round when a step needs the whole list."""

    def __init__(self, pipeline: AggregationPipeline, state: tuple, params: P.ParamsT, round_info: RoundInfo):
        self._transforms, self._reducer, self._after, self._optimizer = pipeline.parts()
        steps = len(self._transforms) + len(self._after) + 2
        if len(state) != steps:
            raise FedmiError(f"aggregation: the state has {len(state)} entries, the pipeline {pipeline} "
                             f"has {steps} steps (a checkpoint of another pipeline?)")
        self._state, self._params, self._info = list(state), params, round_info
        needs_all = pipeline.needs_all_updates
        self._buffer: list[Update] | None = [] if needs_all else None
        r = len(self._transforms)  # the reducer's entry in the state
        self._acc = None if needs_all else self._reducer.start_round(params, self._state[r], round_info)
        self.count = 0

    def add(self, update: Update) -> None:
        if self._buffer is not None:
            self._buffer.append(update)
        else:
            for i, t in enumerate(self._transforms):
                update, self._state[i] = t.map_update(update, self._state[i], self._info)
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
        for j, t in enumerate(self._after, start=r + 1):
            delta, self._state[j] = t.transform_delta(delta, self._state[j], self._info)
        new_params, self._state[-1] = self._optimizer.step(self._params, delta, self._state[-1])
        return new_params, tuple(self._state)
