"""The round loop (survey Fig. 1): select -> broadcast -> local work -> upload -> aggregate
-> evaluate -> log -> checkpoint.

The runner is the server. It advances one `ServerState` a round at a time and reaches the sites
only through a `Runtime`, which hands back `Update`s and metrics, never data.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from fedmi.core import params as P
from fedmi.core.extras import LABEL_DISTRIBUTION
from fedmi.core.local import LocalMethod
from fedmi.core.runtime import Runtime
from fedmi.core.server_state import ServerState
from fedmi.core.types import Rejected, RoundInfo, SiteInfo, Update
from fedmi.errors import FedmiError, counted

log = logging.getLogger("fedmi")


class RoundAggregator(Protocol):
    def add(self, update: Update) -> None: ...

    def finish(self) -> tuple[P.Params, Any]: ...


class Aggregator(Protocol):
    """What the runner needs of an aggregation pipeline (`fedmi.server.pipeline.AggregationPipeline`)."""

    def init(self, params: P.ParamsT) -> Any:
        """The aggregation state before the first round."""

    def begin_round(self, state: Any, params: P.ParamsT, round_info: RoundInfo) -> RoundAggregator:
        """Updates are added one by one as they arrive, so a streaming aggregator holds O(model)."""

    # Optional: `min_updates() -> int`, the fewest updates a round needs (Krum: 2f + 3); the runner
    # refuses, before round 1, a federation that could never give that many.
    # Optional: `broadcast(state) -> dict[str, Tensor]`, what the sites receive with the parameters
    # (SCAFFOLD's server control variate), as `RoundInfo.extras`.
    # Optional: `releases_empty() -> bool`, whether a round with no update is defined (a private sum over
    # Poisson-sampled sites releases its noise alone); only then may min_sites be 0.
    # Optional: `report(state) -> dict[str, float]`, figures of its state each round's record carries
    # (the privacy budget spent so far, `epsilon` and `delta`).


class Selector(Protocol):
    """Which sites train in a round. Sees only `SiteInfo`s, never data.

    Example (every other site, alternating by round):

        class Alternate:
            def select(self, sites, round_info, rng):
                return [s.name for i, s in enumerate(sites) if (i + round_info.round) % 2 == 0]
    """

    def select(self, sites: Sequence[SiteInfo], round_info: RoundInfo, rng: np.random.Generator) -> list[str]:
        """Args: every site's info, the round, the server's selection generator. Returns: site names."""


@dataclass(frozen=True)
class _Report:
    """What the round's record keeps of an accepted update once its delta is folded in."""

    site: str
    num_examples: int
    train_loss: float | None
    norm: float  # of its delta: how far the site moved the model (to tell who made a run diverge)


@dataclass(frozen=True)
class _Budget:
    """The privacy budget a site reported with an update (DP-SGD's own accountant): its ε so far."""

    site: str
    epsilon: float
    delta: float | None
    noise_multiplier: float | None


@dataclass(frozen=True)
class ValidationSelection:
    """Keep the global model of the round whose validation metric, averaged over the sites, is best
    (MedMNIST's "the epoch with the best validation AUC"), scored on the sites' validation splits
    (`SiteData.x_val`), never their test splits.

    Attributes:
      metric: the metric to compare ("auc").
      higher_is_better: whether a larger value is better.
    """

    metric: str
    higher_is_better: bool = True

    def score(self, evaluations: dict[str, dict]) -> float | None:
        """The mean over sites of the metric, where defined."""
        values = [m[self.metric] for m in evaluations.values() if m.get(self.metric) is not None]
        return sum(values) / len(values) if values else None

    def better(self, score: float | None, best: float | None) -> bool:
        if score is None:
            return False
        return best is None or (score > best if self.higher_is_better else score < best)


@dataclass
class RunResult:
    params: P.Params
    history: list[dict] = field(default_factory=list)
    state: ServerState | None = None
    best_params: P.Params | None = None  # with a ValidationSelection: the chosen round's global model
    best_round: int | None = None


def check_update(update: Update, reference: P.ParamsT, max_norm: float | None) -> None:
    """Reject a malformed or absurd update: wrong names/shapes/dtypes, NaN/Inf, a training loss
    that is not finite (local training diverged), norm too large."""
    P.check_compatible(update.delta, reference, f"update from site {update.site}")
    loss = update.metrics.get("train_loss")
    if loss is not None and not math.isfinite(loss):
        raise FedmiError(f"update from site {update.site}: its training loss is {loss}, local training diverged "
                         "(lower the learning rate, or standardise the features)")
    if max_norm is not None and (norm := P.l2_norm(update.delta)) > max_norm:
        raise FedmiError(f"update from site {update.site}: norm {norm:.3g} exceeds the limit {max_norm:.3g}")


# With `checkpoint_every=None` a checkpoint is written once the time since the last one is this many
# times what writing it took: writing then costs at most 1/(1 + CHECKPOINT_SPACING) of the run's time
# (5 %), whatever the model's size, and a crash loses at most that much more work.
CHECKPOINT_SPACING = 19.0
GROWTH_LIMIT = 100.0  # a training loss this many times its first round's means training diverged
AMPLIFIED = 2.0  # a server step this many times the sites' mean update distance made the model diverge


def _distance(delta: P.ParamsT) -> float:
    """The L2 norm of a change of the floating-point parameters, in float64 (finite where float32 overflows)."""
    norms = [torch.linalg.vector_norm(v, dtype=torch.float64) for v in delta.values() if v.is_floating_point()]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def divergence(loss: float | None, first: float | None, bound: float | None) -> str | None:
    """Why a mean training (or test) loss shows that training diverged, or None if it does not.

    Args:
      loss: the loss now.
      first: the same loss in the run's first round (None: this is the first, or none was recorded).
      bound: the task's `loss_bound` (None: the task implies none).

    Returns:
      A phrase to follow "the loss" in a message ("is 1.2e+08, beyond 6.9e+03, ..."), or None.

    Example::

        divergence(2e8, 0.69, 693.1)   # 'is 2e+08, beyond 693, which ...'
        divergence(80.0, 0.69, 693.1)  # 'is 80, over 100 times its first round's 0.69'
        divergence(0.4, 0.69, 693.1)   # None
    """
    if loss is None:
        return None
    if not math.isfinite(loss):
        return f"is {loss}"
    if bound is not None and loss > bound:
        return f"is {loss:.3g}, beyond {bound:.3g}, which no model of this task reaches unless it diverges"
    if first is not None and first > 0 and loss > GROWTH_LIMIT * first:
        return f"is {loss:.3g}, over {GROWTH_LIMIT:g} times its first round's {first:.3g}"
    return None


def _membership_change(previous: Sequence[SiteInfo] | None, now: Sequence[SiteInfo]
                       ) -> tuple[list[str], list[str]]:
    """The names that joined and that left between two rounds' site lists (none for a first round)."""
    if previous is None:
        return [], []
    before, after = [i.name for i in previous], [i.name for i in now]
    return [n for n in after if n not in before], [n for n in before if n not in after]


def _mean_loss(accepted: Sequence[_Report]) -> float | None:
    """The accepted sites' training loss, weighted by their examples (None if one reported none)."""
    n = sum(a.num_examples for a in accepted)
    if not n or any(a.train_loss is None for a in accepted):
        return None
    return sum(a.num_examples * a.train_loss for a in accepted) / n


def _site_budgets(spent: Sequence[_Budget], history: Sequence[dict]) -> dict:
    """The privacy budget the sites account themselves (DP-SGD: each record; noise at the site: each
    site's training set), in a round's record: each site's ε so far ("site_epsilon": a site that sat
    the round out keeps its last; a later report of one site, from a retry, supersedes its earlier)
    and the largest of them ("local_epsilon", at "local_delta"), the run's guarantee to every
    patient (or site), and the sites' noise multiplier where they share one. `spent`: every update
    that reported a budget, accepted or rejected: its site spent it either way."""
    if not spent:
        return {}
    last = history[-1] if history else {}
    this_round: dict[str, float] = {}
    for b in spent:  # a site trained again in a retry reports its larger budget
        this_round[b.site] = max(b.epsilon, this_round.get(b.site, b.epsilon))
    budgets = {**last.get("site_epsilon", {}), **this_round}
    delta = max((b.delta for b in spent if b.delta is not None), default=0.0)
    out = {"site_epsilon": budgets, "local_epsilon": max(budgets.values()),
           "local_delta": max(delta, last.get("local_delta", 0.0))}
    noise = {b.noise_multiplier for b in spent if b.noise_multiplier is not None}
    if len(noise) == 1:
        out["noise_multiplier"] = noise.pop()
    return out


def _stops(completed: int) -> str:
    return "the run stops here" + (f" (the last checkpoint holds round {completed})" if completed else "")


@dataclass
class Runner:
    runtime: Runtime
    method: LocalMethod
    aggregator: Aggregator
    rounds: int
    seed: int = 0
    selector: Selector | None = None  # None: every site, every round
    evaluate_every: int = 1  # 0: evaluate only after the last round
    max_update_norm: float | None = None
    min_sites: int = 1  # a round with fewer accepted updates is run again (0: a round may have none)
    max_retries: int = 2  # ... at most this many times, then the run stops with an error
    checkpoint: Path | None = None  # the server state, written after the rounds `checkpoint_every` says
    # every k rounds (and after the last); None: as often as keeps writing within 5 % of the time
    checkpoint_every: int | None = 1
    keep_checkpoints: int = 2  # the latest and the ones before it kept (the fallback of a cut-short latest)
    before_checkpoint: Callable[[int], None] | None = None  # called with the round just before it is written
    clock: Callable[[], float] = time.perf_counter  # the adaptive cadence's clock
    # (when the last checkpoint's write ended, how long it took): the adaptive cadence's measure
    _last_write: tuple[float, float] | None = field(default=None, init=False, repr=False)
    sink: Callable[[dict], None] | None = None  # receives one record per round
    tags: dict = field(default_factory=dict)  # added to every record (method, repeat, ...)
    selection: ValidationSelection | None = None  # keep the round that scores best on validation splits
    loss_bound: float | None = None  # the task's `loss_bound`: a loss beyond it is divergence
    stop_on_divergence: bool = True  # False: a diverged model is a result (a protocol measuring attacks)

    def initial_state(self, params: P.ParamsT) -> ServerState:
        return ServerState.initial(params, self.aggregator.init(self._shared(params)), self.seed)

    def _shared(self, params: P.ParamsT) -> P.ParamsT:
        """The entries of the global model that updates carry and the aggregation works on: all of
        them but those the method keeps at the sites (partial sharing)."""
        private = set(self.method.private_names(tuple(params)))
        return P.Params((k, v) for k, v in params.items() if k not in private) if private else params

    def run(self, params: P.ParamsT, on_round: Callable[[int], None] | None = None,
            resume: ServerState | None = None) -> RunResult:
        """Run the rounds from `params`, or go on from a saved `resume` state.

        Local batches are keyed by (seed, round, site) and the selector's generator is part of
        the state, so a resumed run reaches the uninterrupted run's model.
        """
        if self.rounds < 1:
            raise FedmiError(f"rounds must be at least 1, got {self.rounds}")
        if self.min_sites < 0 or (self.min_sites == 0 and not getattr(self.aggregator, "releases_empty", bool)()):
            raise FedmiError(f"min_sites must be at least 1, got {self.min_sites} (0 only for an aggregation whose "
                             "round is defined without updates, a private sum over Poisson-sampled sites)")
        if self.keep_checkpoints < 1:
            raise FedmiError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise FedmiError(f"checkpoint_every must be at least 1 (or None: adaptive), got {self.checkpoint_every}")
        self._last_write = None
        if resume is None:
            state = self.initial_state(params)
        else:
            if resume.seed != self.seed:
                raise FedmiError(f"the checkpoint was made with seed {resume.seed}, this run has seed {self.seed}")
            if resume.round > self.rounds:
                raise FedmiError(f"the checkpoint has {counted(resume.round, 'round')}, this run only {self.rounds}")
            P.check_compatible(resume.params, params, "checkpoint")
            state = resume
            log.info("resuming after round %d of %d", state.round, self.rounds)
        if self.selection is not None and (self.checkpoint is not None or resume is not None):
            raise FedmiError("choosing a round on validation splits keeps its model in memory only: "
                             "it cannot be combined with checkpoints or resume")
        infos = self.runtime.site_infos()
        self._check_feasible(len(infos))
        best, best_params, best_round = None, None, None
        previous = None
        while state.round < self.rounds:
            if previous is not None:  # sites may have joined or left since (a deployment)
                infos = self.runtime.site_infos()
            state = self.run_round(state, infos, previous)
            previous = infos
            if self.selection is not None:
                score = state.history[-1]["val_score"]
                if self.selection.better(score, best):
                    best, best_params, best_round = score, P.clone(state.params), state.round
            if on_round is not None:
                on_round(state.round)
        return RunResult(state.params, state.history, state, best_params, best_round)

    def _check_feasible(self, sites: int) -> None:
        """Fail before round 1 on settings no round could meet."""
        if self.min_sites > sites:
            raise FedmiError(f"min_sites is {self.min_sites} but the federation has {sites} sites")
        needed = self.aggregator.min_updates() if hasattr(self.aggregator, "min_updates") else 1
        if needed > sites:
            raise FedmiError(f"aggregation {self.aggregator} needs at least {needed} updates a round, "
                             f"the federation has {sites} sites")

    def _broadcast(self, state: ServerState, infos: Sequence[SiteInfo]) -> dict[str, torch.Tensor]:
        """What every site receives with the parameters: the aggregation's broadcast and, for a method
        that asks for it (FedSLD), the federation's label distribution from the sites' label counts."""
        extras = dict(self.aggregator.broadcast(state.aggregation)) if hasattr(self.aggregator, "broadcast") else {}
        if self.method.needs_label_distribution:
            counts = [i.label_counts for i in infos]
            if not infos or any(c is None for c in counts):
                missing = ", ".join(i.name for i in infos if i.label_counts is None)
                raise FedmiError(f"method {self.method.name} needs every site's label counts (class labels, one a "
                                 f"sample); none from: {missing}")
            total = torch.zeros(max(len(c) for c in counts), dtype=torch.float64)
            for c in counts:
                total[: len(c)] += torch.tensor(c, dtype=torch.float64)
            extras[LABEL_DISTRIBUTION] = (total / total.sum()).float()
        return extras

    def run_round(self, state: ServerState, infos: Sequence[SiteInfo],
                  previous: Sequence[SiteInfo] | None = None) -> ServerState:
        """`state` advanced by one round (its record logged, checkpointed and appended to its history).

        `infos`: the sites available for this round; `previous`: those of the round before, when this
        run had one (a change is logged and recorded as the round's "joined" and "left")."""
        r = state.round
        joined, left = _membership_change(previous, infos)
        if joined or left:
            log.info("round %d: %s; %d sites in the federation", r + 1, "; ".join(
                f"{', '.join(names)} {what}" for names, what in ((joined, "joined"), (left, "left")) if names),
                len(infos))
        info = RoundInfo(r, self.rounds, self.seed, len(infos), self._broadcast(state, infos))
        chosen = [s.name for s in infos] if self.selector is None else self.selector.select(infos, info,
                                                                                            state.selection)
        if len(chosen) < self.min_sites:
            raise FedmiError(f"round {r + 1}: {len(chosen)} sites selected but min_sites is {self.min_sites}")
        started = time.perf_counter()
        params, aggregation, accepted, rejected, spent = self._round(state, chosen, info)
        seconds = time.perf_counter() - started  # broadcast, local training, upload, aggregation
        record = self._record(r, accepted, rejected, params)
        record.update(_site_budgets(spent, state.history))
        if hasattr(self.aggregator, "report"):
            record.update(self.aggregator.report(aggregation))
        self._check_divergence(r, record, accepted, state.params, params, state.history)
        record["seconds"] = round(seconds, 4)
        if joined or left:
            record.update(joined=joined, left=left)
        log.info("round %d/%d: %d sites, training loss %s", r + 1, self.rounds, len(accepted),
                 f"{record['train_loss']:.4f}" if "train_loss" in record else "n/a")
        state = ServerState(params, aggregation, state.selection, r + 1, [*state.history, record], state.seed)
        if self.sink is not None:
            self.sink(record)
        if self.checkpoint is not None and self._checkpoint_due(state.round):
            started = self.clock()
            if self.before_checkpoint is not None:
                self.before_checkpoint(state.round)
            state.save(self.checkpoint, self.keep_checkpoints)
            ended = self.clock()
            self._last_write = (ended, ended - started)
        return state

    def _checkpoint_due(self, completed: int) -> bool:
        """Whether to write the state after round `completed` (always after the last, and the first)."""
        if completed == self.rounds:
            return True
        if self.checkpoint_every is not None:
            return completed % self.checkpoint_every == 0
        if self._last_write is None:
            return True
        ended, took = self._last_write
        return self.clock() - ended >= CHECKPOINT_SPACING * took

    def _round(self, state: ServerState, chosen: list[str], info: RoundInfo
               ) -> tuple[P.Params, Any, list[_Report], list[str], list[_Budget]]:
        """One round, run again (same sites, same randomness) while fewer than min_sites updates are
        accepted; and the privacy budgets every update reported, accepted or not, in every attempt."""
        r, params = info.round, state.params
        shared = self._shared(params)
        spent: list[_Budget] = []  # a site that trained spent its budget, whatever became of its update
        for attempt in range(self.max_retries + 1):
            round_agg = self.aggregator.begin_round(state.aggregation, shared, info)
            accepted: list[_Report] = []
            rejected: list[str] = []
            for update in self.runtime.train(self.method, params, chosen, info):
                if isinstance(update, Update) and isinstance(update.metrics.get("epsilon"), float):
                    m = update.metrics
                    spent.append(_Budget(update.site, m["epsilon"], m.get("delta"), m.get("noise_multiplier")))
                report = self._take(update, shared, round_agg, r)
                site = update.site
                del update  # released before the runtime builds the next one: O(model) server memory
                if report is None:
                    rejected.append(site)
                else:
                    accepted.append(report)
            if len(accepted) >= self.min_sites:
                if len(accepted) < len(chosen):
                    missing = sorted(set(chosen) - {a.site for a in accepted})
                    log.warning("round %d: completed with %d of %d sites (min_sites %d); left out: %s",
                                r + 1, len(accepted), len(chosen), self.min_sites, ", ".join(missing))
                new_params, aggregation = round_agg.finish()
                if shared is not params:  # the server's copy of the private entries stays as it is
                    new_params = P.Params((k, new_params[k] if k in shared else v.clone()) for k, v in params.items())
                if not P.all_finite(new_params):
                    self._diverged(r, "the aggregated global model holds NaN or infinite values, though every "
                                      "site's update was finite", accepted, params, new_params, state.history)
                order = {name: i for i, name in enumerate(chosen)}  # replies come in arrival order
                accepted.sort(key=lambda a: order[a.site])
                rejected.sort(key=lambda s: order.get(s, len(order)))
                return new_params, aggregation, accepted, rejected, spent
            what = f"round {r + 1}: {len(accepted)} of {len(chosen)} sites gave an acceptable update, " \
                   f"min_sites is {self.min_sites}"
            if attempt < self.max_retries:
                log.warning("%s; running the round again (retry %d of %d)", what, attempt + 1, self.max_retries)
        raise FedmiError(f"{what}, still after {self.max_retries} retries; " + _stops(r))

    def _take(self, update: Update | Rejected, params: P.ParamsT, round_agg: RoundAggregator, r: int
              ) -> _Report | None:
        """Check an update and fold it into the round's aggregate; None if it was rejected."""
        try:
            if isinstance(update, Rejected):
                raise FedmiError(update.reason)
            check_update(update, params, self.max_update_norm)
            round_agg.add(update)  # a step may refuse what it cannot fold (a missing declared extra)
        except FedmiError as e:
            log.warning("round %d: rejected %s", r + 1, e)
            return None
        return _Report(update.site, update.num_examples, update.metrics.get("train_loss"), _distance(update.delta))

    def _local_lr(self) -> str:
        lr = self.method.spec().get("options", {}).get("lr") if hasattr(self.method, "spec") else None
        return f"the local learning rate (lr{f', now {lr:g}' if isinstance(lr, (int, float)) else ''})"

    def _diverged(self, r: int, what: str | None, accepted: Sequence[_Report], old: P.ParamsT, new: P.ParamsT,
                  history: Sequence[dict]) -> None:
        """Stop the run: `what` went wrong in round r (None: the training loss itself). The cause named
        is the server's step when it moved the model much farther than the sites' updates did (their
        weighted mean can move it no farther than their mean distance), else local training when the
        sites' training loss diverged, else the server's step."""
        train_loss = _mean_loss(accepted)
        n = sum(a.num_examples for a in accepted)
        moved = sum(a.num_examples * a.norm for a in accepted) / n if n else math.nan
        step = _distance(P.sub(new, old))
        server_step = f"lower its learning rate (server_lr, or the lr of the aggregator's step: {self.aggregator})"
        why = divergence(train_loss, *self._limits(history))
        if what is None:
            what = f"the sites' mean training loss {why}"
        if math.isfinite(step) and math.isfinite(moved) and step > AMPLIFIED * moved:
            cause = (f"the server's step diverged: it moved the model {step:.3g}, the sites' updates {moved:.3g} on "
                     f"average; {server_step}")
        elif why:
            cause = (f"local training diverged{'' if what.startswith('the sites') else f' (its mean loss {why})'}; "
                     f"lower {self._local_lr()}, or standardise the features")
        else:
            shown = "n/a" if train_loss is None else f"{train_loss:.3g}"
            cause = f"the server's step diverged, the sites' training loss stayed at {shown}; {server_step}"
        raise FedmiError(f"round {r + 1}: {what}: {cause}; " + _stops(r))

    def _limits(self, history: Sequence[dict]) -> tuple[float | None, float | None]:
        """`divergence`'s (first, bound): none but non-finite values when a diverged model is a result."""
        if not self.stop_on_divergence:
            return None, None
        return (history[0].get("train_loss") if history else None), self.loss_bound

    def _local_lr(self) -> str:
        lr = self.method.spec().get("options", {}).get("lr") if hasattr(self.method, "spec") else None
        return f"the local learning rate (lr{f', now {lr:g}' if isinstance(lr, (int, float)) else ''})"

    def _check_divergence(self, r: int, record: dict, accepted: Sequence[_Report], old: P.ParamsT, new: P.ParamsT,
                          history: Sequence[dict]) -> None:
        """Stop a run whose training diverged: the sites' mean training loss, or the global model's
        test loss at a site that trained it this round, non-finite or beyond `divergence`'s limits.
        At another site (its update was rejected: extreme values in its data, a hostile site) a
        non-finite loss is named in a warning."""
        first, bound = self._limits(history)
        if divergence(record.get("train_loss"), first, bound):
            self._diverged(r, None, accepted, old, new, history)
        test = record.get("test") or {}
        trained = {a.site for a in accepted}
        diverged = {site: m["loss"] for site, m in test.items() if divergence(m.get("loss"), None, bound)}
        if at_trained := {site: loss for site, loss in diverged.items() if site in trained}:
            self._diverged(r, "the global model's test loss is " + ", ".join(
                f"{loss:.3g} at {site}" for site, loss in at_trained.items()), accepted, old, new, history)
        if bad := {site: loss for site, loss in diverged.items() if not math.isfinite(loss)}:
            log.warning("round %d: the global model's test loss is not finite at %s, a site whose update was not "
                        "accepted", r + 1, ", ".join(f"{site} ({loss})" for site, loss in bad.items()))

    def _record(self, r: int, accepted: list[_Report], rejected: list[str], params: P.ParamsT) -> dict:
        record: dict = {**self.tags, "round": r + 1, "sites": [a.site for a in accepted], "rejected": rejected}
        if (train_loss := _mean_loss(accepted)) is not None:
            record["train_loss"] = train_loss
        if self.selection is not None:  # every round: the choice is among all of them
            record["val_score"] = self.selection.score(self.runtime.evaluate(params, self.method, split="val"))
        last = r + 1 == self.rounds
        if last or (self.evaluate_every and (r + 1) % self.evaluate_every == 0):
            record["test"] = self.runtime.evaluate(params, self.method)
        return record
