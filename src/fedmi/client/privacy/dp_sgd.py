"""Sample-level differential privacy at each site: DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov,
Talwar and Zhang, "Deep Learning with Differential Privacy", CCS 2016; survey §VI-A).

Each local step draws its batch B by Poisson sampling (every sample with probability q = b / n_k,
b the batch size) and replaces the batch gradient by

    g = ( sum_{i in B} g_i · min(1, C / ||g_i||_2) + N(0, (σ·C)² I) ) / b

with g_i the gradient of sample i's own loss over every trained parameter: one patient moves the
sum by at most C, and the noise hides that move. The inner method then steps with g as it would
with any gradient (SGD, momentum, Adam; FedProx's proximal term, which no sample enters, is added
unclipped). Each site's steps are the Poisson-sampled Gaussian mechanism with rate q_k and noise
multiplier σ, composed over every step of every round the site trained in: the site counts its
own steps (site state, kept in its checkpoint) and reports its ε at δ with each update, from the
PLD accountant of `dp-accounting`. A patient's privacy is that of the site holding their record:
the run's ε is the largest over the sites.

What the site releases besides the update: its ε, the number of its training records (n_k, taken
as public: the sampling rate and the accountant use it), and its models' test metrics. Its
training losses, which are the records' own, unclipped, stay at the site. A deployed site draws
its batches and noise from a key of its own (`train_site`'s `private_key`), refuses a round whose
noise multiplier or sampling rate differ from those its budget was spent at, keeps its budget when
a round is undone, and refuses to train past `max_rounds`.
"""

from __future__ import annotations

from dataclasses import replace
import math
from typing import Any

import torch

from fedmi.client.wrapped import WrappedMethod
from fedmi.core.local import LocalMethod, SiteContext, State, register_method
from fedmi.errors import FedmiError, check_number
from fedmi.privacy import gaussian_epsilon

BUDGET = "dp_sgd_budget"  # the site state's record of what it has spent: steps, rounds, noise multiplier, rate


@register_method
class DpSgd(WrappedMethod):
    """Another local method trained with per-sample clipping and Gaussian noise at every step.

    Args:
      inner: the method whose optimiser and regulariser the site uses (a `LocalMethod`, or its `spec()`);
        its objective must be the task's loss (plus a regulariser).
      clip_norm: C, the bound on each sample's gradient (L2, over all trained parameters).
      noise_multiplier: σ; the noise's standard deviation is σ·C.
      delta: the δ at which each site reports its ε.
      max_rounds: the most rounds a site trains in the run (its budget; None: no limit). A site asked
        for more (a server replaying rounds) refuses.
    Example: ``DpSgd(make_method("fedavg", lr=0.1, batch_size=32), clip_norm=1.0, noise_multiplier=1.1)``
    """

    name = "dp_sgd"
    per_sample_gradients = True

    def __init__(self, inner: LocalMethod | dict, clip_norm: float, noise_multiplier: float, delta: float = 1e-5,
                 max_rounds: int | None = None):
        super().__init__(inner)
        inner = self.inner
        for hook in ("objective", "trainable"):
            if inner.overrides(hook):
                raise FedmiError(f"dp_sgd bounds each sample's gradient of the task's loss; trainer {inner.name} "
                                 f"defines its own {hook}, which dp_sgd cannot split into samples")
        if inner.per_sample_gradients:
            raise FedmiError(f"dp_sgd over {inner.name}: the trainer already forms its gradients from samples")
        self.clip_norm = check_number("dp_sgd clip_norm", clip_norm, 0, low_open=True)
        self.noise_multiplier = check_number("dp_sgd noise_multiplier", noise_multiplier, 0)
        self.delta = check_number("dp_sgd delta", delta, 0, 1, low_open=True, high_open=True)
        if max_rounds is not None and (not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1):
            raise FedmiError(f"dp_sgd max_rounds must be a whole number of at least 1, got {max_rounds!r}")
        self.max_rounds = max_rounds
        self.schedule = replace(inner.schedule, sampling="poisson")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "clip_norm": self.clip_norm, "noise_multiplier": self.noise_multiplier,
                "delta": self.delta, "max_rounds": self.max_rounds}

    def combine_gradients(self, sample_grads, mask, expected_size, noise, ctx):
        flat = torch.cat([g.flatten(1) for g in sample_grads.values()], 1)
        norms = torch.linalg.vector_norm(flat, dim=1)
        factor = torch.clamp(self.clip_norm / (norms + 1e-12), max=1.0) * mask.to(norms.dtype)
        std = self.noise_multiplier * self.clip_norm
        return {k: (torch.tensordot(factor, g, dims=1) + std * noise[k]) / expected_size
                for k, g in sample_grads.items()}

    # The site state: the inner method's, and beside it the site's budget: the DP-SGD steps and rounds
    # it has run, at which noise multiplier and sampling rate. The counts travel through the round in
    # the client state (scalars, which stack across sites); the settings are checked here.
    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        site_state = site_state or {}
        spent = site_state.get(BUDGET)
        rate = self.schedule.sampling_rate(ctx.num_train)
        if spent is not None:
            before = (float(spent["noise_multiplier"]), float(spent["sampling_rate"]))
            if not math.isclose(before[0], self.noise_multiplier, rel_tol=1e-9) or \
                    not math.isclose(before[1], rate, rel_tol=1e-9):
                raise FedmiError(f"refused: site {ctx.site} ran its earlier DP-SGD steps at noise multiplier "
                                 f"{before[0]:.4g} and sampling rate {before[1]:.4g}; this round asks "
                                 f"{self.noise_multiplier:.4g} and {rate:.4g}, which its budget cannot compose "
                                 "(resume with the run's own settings)")
            if self.max_rounds is not None and int(spent["rounds"]) >= self.max_rounds:
                raise FedmiError(f"refused: site {ctx.site} has run the {self.max_rounds} DP-SGD rounds its privacy "
                                 "budget allows; it trains no more in this run")
        state = self.inner.init(global_params, site_state.get("inner"), ctx)
        zero = torch.zeros((), dtype=torch.int64)
        state[BUDGET] = {"steps": zero.clone() if spent is None else spent["steps"].clone(),
                         "rounds": zero.clone() if spent is None else spent["rounds"].clone()}
        return state

    def final(self, state: State, ctx: SiteContext):
        counts = state.pop(BUDGET)
        steps, rounds = int(counts["steps"]) + ctx.local_steps, int(counts["rounds"]) + 1
        update, kept = self.inner.final(state, ctx)
        rate = self.schedule.sampling_rate(ctx.num_train)
        epsilon = gaussian_epsilon(self.noise_multiplier, rate, steps, self.delta) if self.noise_multiplier > 0 \
            else float("inf")
        # The training losses are the data's, unclipped and without noise: they stay at the site.
        metrics = {k: v for k, v in update.metrics.items() if k not in ("train_loss", "start_loss")}
        budget = {"steps": torch.tensor(steps), "rounds": torch.tensor(rounds),
                  "noise_multiplier": torch.tensor(self.noise_multiplier, dtype=torch.float64),
                  "sampling_rate": torch.tensor(rate, dtype=torch.float64)}
        mine = {BUDGET: budget, **({"inner": kept} if kept is not None else {})}
        return replace(update, metrics={**metrics, "epsilon": epsilon, "delta": self.delta,
                                        "noise_multiplier": self.noise_multiplier}), mine

    def undone(self, before, after):
        """The inner method's state before the undone round, and the budget after it: the update was
        computed, and a server that says it never arrived may have seen it."""
        kept = dict(before or {})
        if after and BUDGET in after:
            kept[BUDGET] = after[BUDGET]
        return kept or None

    def evaluation_params(self, global_params, site_state):
        return self.inner.evaluation_params(global_params, (site_state or {}).get("inner"))

    def __repr__(self) -> str:
        return (f"DpSgd({self.inner!r}, clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, "
                f"delta={self.delta})")
