"""The round loop (survey Fig. 1): select -> broadcast -> local training -> upload -> aggregate
-> evaluate -> log -> checkpoint.

The runner is the server. It holds the global parameters, the aggregator and the selector, and
reaches the sites only through a `Runtime`, which hands back `Update`s and metrics, never data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from fedmi.client.trainers import LocalTrainer
from fedmi.core import params as P
from fedmi.core.rng import Stream, numpy_generator
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.runtime.base import Runtime
from fedmi.server.selection import AllSites, Selector

log = logging.getLogger("fedmi")


class RoundAggregator(Protocol):
    def add(self, update: Update) -> None: ...

    def finish(self) -> tuple[P.Params, Any]: ...


class Aggregator(Protocol):
    def init(self, params: P.ParamsT) -> Any: ...

    def begin_round(self, state: Any, params: P.ParamsT, round_info: RoundInfo) -> RoundAggregator:
        """Updates are added one by one as they arrive, so a streaming aggregator holds O(model)."""


@dataclass(frozen=True)
class _Report:
    """What the round's record keeps of an accepted update once its delta is folded in."""

    site: str
    num_examples: int
    train_loss: float | None


@dataclass
class RunResult:
    params: P.Params
    history: list[dict] = field(default_factory=list)


def check_update(update: Update, reference: P.ParamsT, max_norm: float | None) -> None:
    """Reject a malformed or absurd update: wrong names/shapes/dtypes, NaN/Inf, norm too large."""
    P.check_compatible(update.delta, reference, f"update from site {update.site}")
    if max_norm is not None and (norm := P.l2_norm(update.delta)) > max_norm:
        raise FedmiError(f"update from site {update.site}: norm {norm:.3g} exceeds the limit {max_norm:.3g}")


@dataclass
class Runner:
    runtime: Runtime
    trainer: LocalTrainer
    aggregator: Aggregator
    rounds: int
    seed: int = 0
    selector: Selector = field(default_factory=AllSites)
    evaluate_every: int = 1  # 0: evaluate only after the last round
    max_update_norm: float | None = None
    checkpoint: Path | None = None  # written after every round
    sink: Callable[[dict], None] | None = None  # receives one record per round
    tags: dict = field(default_factory=dict)  # added to every record (method, repeat, ...)

    def run(self, params: P.ParamsT, on_round: Callable[[int], None] | None = None) -> RunResult:
        if self.rounds < 1:
            raise FedmiError(f"rounds must be at least 1, got {self.rounds}")
        params = P.clone(params)
        state = self.aggregator.init(params)
        infos = self.runtime.site_infos()
        select_rng = numpy_generator(Stream.SELECTION, self.seed)
        result = RunResult(params)
        for r in range(self.rounds):
            info = RoundInfo(r, self.rounds, self.seed)
            chosen = self.selector.select(infos, info, select_rng)
            round_agg = self.aggregator.begin_round(state, params, info)
            accepted: list[_Report] = []
            rejected: list[str] = []
            for update in self.runtime.train(self.trainer, params, chosen, info):
                report = self._take(update, params, round_agg, r)
                site = update.site
                del update  # released before the runtime builds the next one: O(model) server memory
                if report is None:
                    rejected.append(site)
                else:
                    accepted.append(report)
            if accepted:
                params, state = round_agg.finish()
            else:
                log.error("round %d: no acceptable update; the global model is unchanged", r + 1)
            record = self._record(r, accepted, rejected, params)
            log.info("round %d/%d: %d sites, training loss %s", r + 1, self.rounds, len(accepted),
                     f"{record['train_loss']:.4f}" if "train_loss" in record else "n/a")
            result.history.append(record)
            if self.sink is not None:
                self.sink(record)
            if self.checkpoint is not None:
                P.save(params, self.checkpoint, metadata={"round": str(r + 1), "seed": str(self.seed)})
            if on_round is not None:
                on_round(r + 1)
        result.params = params
        return result

    def _take(self, update: Update, params: P.ParamsT, round_agg: RoundAggregator, r: int) -> _Report | None:
        """Check an update and fold it into the round's aggregate; None if it was rejected."""
        try:
            check_update(update, params, self.max_update_norm)
        except FedmiError as e:
            log.warning("round %d: rejected %s", r + 1, e)
            return None
        round_agg.add(update)
        return _Report(update.site, update.num_examples, update.metrics.get("train_loss"))

    def _record(self, r: int, accepted: list[_Report], rejected: list[str], params: P.ParamsT) -> dict:
        n = sum(a.num_examples for a in accepted)
        record: dict = {**self.tags, "round": r + 1, "sites": [a.site for a in accepted], "rejected": rejected}
        if n and all(a.train_loss is not None for a in accepted):
            record["train_loss"] = sum(a.num_examples * a.train_loss for a in accepted) / n
        last = r + 1 == self.rounds
        if last or (self.evaluate_every and (r + 1) % self.evaluate_every == 0):
            record["test"] = self.runtime.evaluate(params)
        return record
