"""`WrappedMethod`: a local method that trains as another one does and changes only what it names.

The base of the methods that act on an update after local training (corrupted sites, clipped
updates): every step of training is the inner method's, so they work over any method and runtime.
"""

from __future__ import annotations

from typing import Any

import torch

from fedmi.core.local import Batch, LocalMethod, SiteContext, State


class WrappedMethod(LocalMethod):
    """Trains as `inner` does; a subclass overrides `final` (or more) to change what is sent.

    Args:
      inner: the method every site trains with (a `LocalMethod`, or its `spec()`).
    Example:

        class Halved(WrappedMethod):
            name = "halved"
            def final(self, state, ctx):
                update, kept = self.inner.final(state, ctx)
                return replace(update, delta=P.scale(update.delta, 0.5)), kept
    """

    def __init__(self, inner: LocalMethod | dict):
        if not isinstance(inner, LocalMethod):
            from fedmi.client import method_from_spec  # the package imports this module: not at import time

            inner = method_from_spec(inner)
        self.inner = inner
        self.schedule = inner.schedule
        self.elementwise = inner.elementwise
        self.needs_label_distribution = inner.needs_label_distribution
        self.default_aggregator = inner.default_aggregator
        self.per_sample_gradients = type(self).per_sample_gradients or inner.per_sample_gradients

    def options(self) -> dict[str, Any]:
        return {"inner": self.inner.spec()}

    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        return self.inner.init(global_params, site_state, ctx)

    def trainable(self, state: State) -> dict[str, torch.Tensor]:
        return self.inner.trainable(state)

    def regulariser(self, state: State, ctx: SiteContext) -> torch.Tensor | None:
        return self.inner.regulariser(state, ctx)

    def objective(self, state: State, batch: Batch, ctx: SiteContext) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.objective(state, batch, ctx)

    def step(self, state: State, grads: dict[str, torch.Tensor], ctx: SiteContext) -> State:
        return self.inner.step(state, grads, ctx)

    def combine_gradients(self, sample_grads, mask, expected_size, noise, ctx: SiteContext):
        return self.inner.combine_gradients(sample_grads, mask, expected_size, noise, ctx)

    def undone(self, before: State | None, after: State | None) -> State | None:
        return self.inner.undone(before, after)

    def private_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        return self.inner.private_names(names)

    def overrides(self, hook: str) -> bool:
        """A hook this wrapper delegates is the inner method's: overridden if it overrides it."""
        if getattr(type(self), hook) is not getattr(WrappedMethod, hook, getattr(LocalMethod, hook)):
            return True
        return self.inner.overrides(hook)

    def evaluation_params(self, global_params, site_state):
        return self.inner.evaluation_params(global_params, site_state)

    def final(self, state: State, ctx: SiteContext):
        return self.inner.final(state, ctx)
