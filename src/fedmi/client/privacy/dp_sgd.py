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
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fedmi.client.wrapped import WrappedMethod
from fedmi.core.local import LocalMethod, SiteContext, State, register_method
from fedmi.errors import FedmiError, check_number
from fedmi.privacy import gaussian_epsilon

STEPS_TAKEN = "dp_sgd_steps"  # the site state's count of DP-SGD steps run so far (its accountant)


@register_method
class DpSgd(WrappedMethod):
    """Another local method trained with per-sample clipping and Gaussian noise at every step.

    Args:
      inner: the method whose optimiser and regulariser the site uses (a `LocalMethod`, or its `spec()`);
        its objective must be the task's loss (plus a regulariser).
      clip_norm: C, the bound on each sample's gradient (L2, over all trained parameters).
      noise_multiplier: σ; the noise's standard deviation is σ·C.
      delta: the δ at which each site reports its ε.
    Example: ``DpSgd(make_method("fedavg", lr=0.1, batch_size=32), clip_norm=1.0, noise_multiplier=1.1)``
    """

    name = "dp_sgd"
    per_sample_gradients = True

    def __init__(self, inner: LocalMethod | dict, clip_norm: float, noise_multiplier: float, delta: float = 1e-5):
        super().__init__(inner)
        inner = self.inner
        for hook in ("objective", "trainable"):
            if getattr(type(inner), hook) is not getattr(LocalMethod, hook):
                raise FedmiError(f"dp_sgd bounds each sample's gradient of the task's loss; trainer {inner.name} "
                                 f"defines its own {hook}, which dp_sgd cannot split into samples")
        if inner.per_sample_gradients:
            raise FedmiError(f"dp_sgd over {inner.name}: the trainer already forms its gradients from samples")
        self.clip_norm = check_number("dp_sgd clip_norm", clip_norm, 0, low_open=True)
        self.noise_multiplier = check_number("dp_sgd noise_multiplier", noise_multiplier, 0)
        self.delta = check_number("dp_sgd delta", delta, 0, 1, low_open=True, high_open=True)
        self.schedule = replace(inner.schedule, sampling="poisson")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "clip_norm": self.clip_norm, "noise_multiplier": self.noise_multiplier,
                "delta": self.delta}

    def combine_gradients(self, sample_grads, mask, expected_size, noise, ctx):
        flat = torch.cat([g.flatten(1) for g in sample_grads.values()], 1)
        norms = torch.linalg.vector_norm(flat, dim=1)
        factor = torch.clamp(self.clip_norm / (norms + 1e-12), max=1.0) * mask.to(norms.dtype)
        std = self.noise_multiplier * self.clip_norm
        return {k: (torch.tensordot(factor, g, dims=1) + std * noise[k]) / expected_size
                for k, g in sample_grads.items()}

    # The inner method's site state, and beside it the count of DP-SGD steps the site has run.
    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        inner_state = (site_state or {}).get("inner")
        state = self.inner.init(global_params, inner_state, ctx)
        taken = (site_state or {}).get(STEPS_TAKEN)
        state[STEPS_TAKEN] = torch.zeros((), dtype=torch.int64) if taken is None else taken.clone()
        return state

    def final(self, state: State, ctx: SiteContext):
        taken = int(state.pop(STEPS_TAKEN)) + ctx.local_steps
        update, kept = self.inner.final(state, ctx)
        rate = self.schedule.sampling_rate(ctx.num_train)
        epsilon = gaussian_epsilon(self.noise_multiplier, rate, taken, self.delta) if self.noise_multiplier > 0 \
            else float("inf")
        mine = {STEPS_TAKEN: torch.tensor(taken, dtype=torch.int64), **({"inner": kept} if kept is not None else {})}
        return replace(update, metrics={**update.metrics, "epsilon": epsilon, "delta": self.delta,
                                                    "noise_multiplier": self.noise_multiplier}), mine

    def evaluation_params(self, global_params, site_state):
        return self.inner.evaluation_params(global_params, (site_state or {}).get("inner"))

    def __repr__(self) -> str:
        return (f"DpSgd({self.inner!r}, clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, "
                f"delta={self.delta})")
