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
its batches and noise from a key of its own (`train_site`'s `private_key`); its budget is kept as
`fedmi.client.privacy.budget` describes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fedmi.client.privacy.budget import BudgetedMethod
from fedmi.core.local import LocalMethod, SiteContext, register_method
from fedmi.errors import FedmiError, check_number

BUDGET = "dp_sgd_budget"  # the site state's record of what it has spent: steps, rounds, noise multiplier, rate


@register_method
class DpSgd(BudgetedMethod):
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
    budget_key, label = BUDGET, "DP-SGD"
    per_sample_gradients = True

    def __init__(self, inner: LocalMethod | dict, clip_norm: float, noise_multiplier: float, delta: float = 1e-5,
                 max_rounds: int | None = None):
        super().__init__(inner, noise_multiplier, delta, max_rounds)
        inner = self.inner
        for hook in ("objective", "trainable"):
            if inner.overrides(hook):
                raise FedmiError(f"dp_sgd bounds each sample's gradient of the task's loss; trainer {inner.name} "
                                 f"defines its own {hook}, which dp_sgd cannot split into samples")
        if inner.per_sample_gradients:
            raise FedmiError(f"dp_sgd over {inner.name}: the trainer already forms its gradients from samples")
        self.clip_norm = check_number("dp_sgd clip_norm", clip_norm, 0, low_open=True)
        self.schedule = replace(inner.schedule, sampling="poisson")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "clip_norm": self.clip_norm}

    def combine_gradients(self, sample_grads, mask, expected_size, noise, ctx):
        flat = torch.cat([g.flatten(1) for g in sample_grads.values()], 1)
        norms = torch.linalg.vector_norm(flat, dim=1)
        factor = torch.clamp(self.clip_norm / (norms + 1e-12), max=1.0) * mask.to(norms.dtype)
        std = self.noise_multiplier * self.clip_norm
        return {k: (torch.tensordot(factor, g, dims=1) + std * noise[k]) / expected_size
                for k, g in sample_grads.items()}

    # Each local step is one Poisson-sampled Gaussian mechanism at the site's rate b / n_k.
    def sampling_rate(self, ctx: SiteContext) -> float:
        return self.schedule.sampling_rate(ctx.num_train)

    def mechanism_steps(self, ctx: SiteContext) -> int:
        return ctx.local_steps

    def __repr__(self) -> str:
        return (f"DpSgd({self.inner!r}, clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, "
                f"delta={self.delta})")
