"""Aggregation steps (server end, survey §V): the extension points, in the shape of optax.

A pipeline is zero or more update transforms, one reducer and at most one server optimiser,
written `clip | weighted_mean | server_sgd(lr=1.0)`. Every step has its own state, made by its
`init` and threaded through the rounds by the pipeline (a tuple with one entry per step, as optax's
`chain` keeps), so the server's checkpoint holds each step's state separately.

- `UpdateTransform`: the round's list of updates -> a new list (clipping, noise, filtering).
- `Reducer`: many updates -> one delta. A streaming reducer folds each update into an O(model)
  accumulator as it arrives (`start` / `fold` / `finish`); one that needs every update at once sets
  `needs_all_updates` and overrides `reduce`. One with state or round-dependent behaviour overrides
  `finish_round` / `reduce_round`.
- `ServerOptimizer`: (params, delta) -> new params (SGD, and adaptive ones such as Adam).

Any step may `broadcast` tensors from its state to the sites with the next round's parameters.

Steps register themselves in `STEPS` under the name pipeline texts use.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

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

    def __or__(self, other: "Step") -> Any:
        from fedmi.server.pipeline import AggregationPipeline

        return AggregationPipeline([self]) | other

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}({args})"


class UpdateTransform(Step):
    """Maps the round's accepted updates to a new list before the reducer.

    Example (scale every update by one half):

        @STEPS.register()
        class Halve(UpdateTransform):
            name = "halve"
            def transform(self, updates, state, round_info):
                return [replace(u, delta=P.scale(u.delta, 0.5)) for u in updates], state
    """

    needs_all_updates: ClassVar[bool] = True  # a transform sees the round's whole list

    def transform(self, updates: list[Update], state: Any, round_info: RoundInfo) -> tuple[list[Update], Any]:
        """Args: the updates, this step's state, the round. Returns: (new updates, new state)."""
        raise NotImplementedError


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
    # (a widening frequency band) overrides these; they default to the stateless forms above.
    def finish_round(self, acc: Any, like: P.ParamsT, state: Any, round_info: RoundInfo) -> tuple[P.Params, Any]:
        """(the round's delta, this step's new state) from a streaming accumulator."""
        return self.finish(acc, like), state

    def reduce_round(self, updates: Sequence[Update], like: P.ParamsT, state: Any, round_info: RoundInfo
                     ) -> tuple[P.Params, Any]:
        """(the round's delta, this step's new state) from all the round's updates."""
        return self.reduce(updates, like), state


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
