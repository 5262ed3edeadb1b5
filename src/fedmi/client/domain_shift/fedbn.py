"""Local batch normalisation: FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via
Local Batch Normalization", ICLR 2021) and SiloBN (Andreux et al. 2020, survey ref. [44]).

Sites that differ in scanner or protocol see differently scaled features; a batch-norm layer's
statistics and affine parameters absorb much of that shift. Both methods train as FedAvg (any of
its optimisers and options) and differ only in what they send:

  FedBN   every batch-norm entry (γ, β, running mean and variance) stays at the site: the server
          averages the rest, w_t+1 = Σ_k n_k w_k / n over non-BN weights only.
  SiloBN  only the statistics (running mean and variance) stay; γ and β are averaged.

The kept entries are site state: a site starts each round from the server's weights with its own
entries substituted, sends a zero delta for them (the server never learns them and its copy stays
as initialised), and evaluates with its own entries (`evaluation_params`). A site in its first
round, or a new site, starts from the server's copy.
"""

from __future__ import annotations

from dataclasses import replace

from fedmi.client.sgd import FedAvg
from fedmi.core import params as P
from fedmi.core.local import SiteContext, State, register_method


@register_method
class FedBN(FedAvg):
    """FedAvg whose batch-norm layers stay at each site (Li et al. 2021).

    Args: those of `FedAvg` (lr, optimizer, local_steps or local_epochs, ...).
    Example: ``make_method("fedbn", optimizer="adam", lr=1e-3, local_epochs=1)``.
    """

    name = "fedbn"
    keeps = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def local_names(self, ctx: SiteContext) -> tuple[str, ...]:
        """The entries this site keeps: batch-norm entries whose last name part is in `keeps`."""
        return tuple(k for k in ctx.batch_norm_names if k.rsplit(".", 1)[-1] in self.keeps)

    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        state = super().init(global_params, site_state, ctx)
        for k, v in ((site_state or {}).get("local") or {}).items():
            group = "params" if k in state["params"] else "buffers"
            state[group][k] = v.clone()  # the round's own copy: steps update it in place
        return state

    def final(self, state: State, ctx: SiteContext):
        update, kept = super().final(state, ctx)
        local = self.local_names(ctx)
        values = {**state["params"], **state["buffers"]}
        # A zero delta for the kept entries: the server keeps its copy.
        delta = P.Params((k, v.new_zeros(v.shape) if k in local else v) for k, v in update.delta.items())
        return replace(update, delta=delta), {**(kept or {}), "local": {k: values[k].detach() for k in local}}

    def evaluation_params(self, global_params: P.ParamsT, site_state: State | None) -> P.ParamsT:
        local = (site_state or {}).get("local")
        if not local:
            return global_params
        return P.Params((k, local.get(k, v)) for k, v in global_params.items())


@register_method
class SiloBN(FedBN):
    """FedAvg whose batch-norm statistics stay at each site, γ and β averaged (Andreux et al. 2020).

    Args: those of `FedAvg`.
    """

    name = "silobn"
    keeps = ("running_mean", "running_var", "num_batches_tracked")
