"""`BudgetedMethod`: a private local method whose site holds its own privacy budget.

A method that adds noise at the site (DP-SGD's per-step noise, noise on the site's whole update)
is a Gaussian mechanism the site runs on its own data; the site, not the server, accounts it. The
site state keeps, beside the inner method's, what the site has spent: its mechanism's steps and
rounds and the noise multiplier and sampling rate they ran at. Each update reports the site's ε at
δ so far (`epsilon`, `delta`, `noise_multiplier` among its metrics, which the runner gathers into
each round's record), and carries no training loss (the records' own, without noise). A site
refuses a round whose noise or rate differ from those its budget was spent at (they would not
compose into the ε it reports), refuses to train past `max_rounds`, and keeps its budget when a
round is undone (the update was computed, and a server that says it never arrived may have seen it).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import torch

from fedmi.client.wrapped import WrappedMethod
from fedmi.core.local import LocalMethod, SiteContext, State
from fedmi.errors import FedmiError, check_number
from fedmi.privacy import gaussian_epsilon


class BudgetedMethod(WrappedMethod):
    """Base of the methods whose sites account their own Gaussian mechanism.

    A subclass says what one round's mechanism is (`sampling_rate`, `mechanism_steps`,
    `accounted_multiplier`) and what the site releases (`release`).

    Args:
      inner: the method every site trains with (a `LocalMethod`, or its `spec()`).
      noise_multiplier: the noise's standard deviation over the clipping norm.
      delta: the δ at which each site reports its ε.
      max_rounds: the most rounds a site trains in the run (None: no limit).
    Example (see `fedmi.client.privacy.local_dp` for a whole one):

        class NoisyUpdates(BudgetedMethod):
            name, budget_key = "noisy_updates", "noisy_updates_budget"
            def release(self, state, ctx):
                update, kept = self.inner.final(state, ctx)
                return replace(update, delta=noised(update.delta, ctx.update_noise())), kept
    """

    budget_key: ClassVar[str] = "privacy_budget"  # the site state's record of what it has spent
    label: ClassVar[str] = "private"  # the mechanism in messages ("DP-SGD")

    def __init__(self, inner: LocalMethod | dict, noise_multiplier: float, delta: float = 1e-5,
                 max_rounds: int | None = None):
        super().__init__(inner)
        self.noise_multiplier = check_number(f"{self.name} noise_multiplier", noise_multiplier, 0)
        self.delta = check_number(f"{self.name} delta", delta, 0, 1, low_open=True, high_open=True)
        if max_rounds is not None and (not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1):
            raise FedmiError(f"{self.name} max_rounds must be a whole number of at least 1, got {max_rounds!r}")
        self.max_rounds = max_rounds

    def options(self) -> dict[str, Any]:
        return {**super().options(), "noise_multiplier": self.noise_multiplier, "delta": self.delta,
                "max_rounds": self.max_rounds}

    # -- the mechanism -------------------------------------------------------------------------
    def sampling_rate(self, ctx: SiteContext) -> float:
        """The probability with which each record enters one step of the mechanism (1: every record)."""
        return 1.0

    def mechanism_steps(self, ctx: SiteContext) -> int:
        """The mechanism's steps in the round just trained (set before `final`: ctx.local_steps is known)."""
        return 1

    def accounted_multiplier(self) -> float:
        """The noise's standard deviation over the mechanism's sensitivity (σ, or z/2 for a release
        whose neighbours differ by 2C)."""
        return self.noise_multiplier

    def release(self, state: State, ctx: SiteContext):
        """(the update as it leaves the site, the inner method's kept state): by default the inner's."""
        return self.inner.final(state, ctx)

    # -- the budget in the site state ----------------------------------------------------------
    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        site_state = site_state or {}
        spent = site_state.get(self.budget_key)
        rate = self.sampling_rate(ctx)
        if spent is not None:
            before = (float(spent["noise_multiplier"]), float(spent["sampling_rate"]))
            if not math.isclose(before[0], self.noise_multiplier, rel_tol=1e-9) or \
                    not math.isclose(before[1], rate, rel_tol=1e-9):
                raise FedmiError(f"refused: site {ctx.site} ran its earlier {self.label} rounds at noise multiplier "
                                 f"{before[0]:.4g} and sampling rate {before[1]:.4g}; this round asks "
                                 f"{self.noise_multiplier:.4g} and {rate:.4g}, which its budget cannot compose "
                                 "(resume with the run's own settings)")
            if self.max_rounds is not None and int(spent["rounds"]) >= self.max_rounds:
                raise FedmiError(f"refused: site {ctx.site} has run the {self.max_rounds} {self.label} rounds its "
                                 "privacy budget allows; it trains no more in this run")
        state = self.inner.init(global_params, site_state.get("inner"), ctx)
        zero = torch.zeros((), dtype=torch.int64)
        # The counts travel through the round in the client state (scalars, which stack across sites).
        state[self.budget_key] = {"steps": zero.clone() if spent is None else spent["steps"].clone(),
                                  "rounds": zero.clone() if spent is None else spent["rounds"].clone()}
        return state

    def final(self, state: State, ctx: SiteContext):
        counts = state.pop(self.budget_key)
        steps, rounds = int(counts["steps"]) + self.mechanism_steps(ctx), int(counts["rounds"]) + 1
        update, kept = self.release(state, ctx)
        rate = self.sampling_rate(ctx)
        epsilon = gaussian_epsilon(self.accounted_multiplier(), rate, steps, self.delta) \
            if self.noise_multiplier > 0 else float("inf")
        # The training losses are the data's, without noise: they stay at the site.
        metrics = {k: v for k, v in update.metrics.items() if k not in ("train_loss", "start_loss")}
        budget = {"steps": torch.tensor(steps), "rounds": torch.tensor(rounds),
                  "noise_multiplier": torch.tensor(self.noise_multiplier, dtype=torch.float64),
                  "sampling_rate": torch.tensor(rate, dtype=torch.float64)}
        mine = {self.budget_key: budget, **({"inner": kept} if kept is not None else {})}
        return replace(update, metrics={**metrics, "epsilon": epsilon, "delta": self.delta,
                                        "noise_multiplier": self.noise_multiplier}), mine

    def undone(self, before, after):
        """The inner method's state before the undone round, and the budget after it."""
        inner = self.inner.undone((before or {}).get("inner"), (after or {}).get("inner"))
        kept = {**({"inner": inner} if inner is not None else {}),
                **({self.budget_key: after[self.budget_key]} if after and self.budget_key in after else {})}
        return kept or None

    def evaluation_params(self, global_params, site_state):
        return self.inner.evaluation_params(global_params, (site_state or {}).get("inner"))
