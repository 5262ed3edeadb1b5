"""Corrupted sites, update side (survey §V-C): a site that sends a broken or hostile update.

`CorruptedUpdates` wraps any local method: every site trains as that method says, and the sites
it names replace their delta before sending it:

  sign_flip   delta -> -scale * delta               (default scale 1)
  scaled      delta -> scale * delta                (model replacement, Bagdasaryan et al. 2020; default 10)
  gaussian    delta -> N(0, scale^2) per entry      (default scale 1; an absolute standard deviation)
  nan / inf   every floating entry NaN / +Inf      (the server must refuse them, never fold them in)

The Gaussian draw is keyed by (seed, round, site), so every runtime sends the same noise. Integer
entries (batch norm's step counter) are left as trained.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import torch

from fedmi.client.wrapped import WrappedMethod
from fedmi.core.local import LocalMethod, SiteContext, State, register_method
from fedmi.core.rng import Stream, torch_generator
from fedmi.errors import FedmiError

UPDATE_CORRUPTIONS = ("sign_flip", "scaled", "gaussian", "nan", "inf")
DEFAULT_SCALE = {"sign_flip": 1.0, "scaled": 10.0, "gaussian": 1.0, "nan": 1.0, "inf": 1.0}


@register_method
class CorruptedUpdates(WrappedMethod):
    """Another local method whose named sites corrupt their updates.

    Args:
      inner: the method every site trains with (a `LocalMethod`, or its `spec()`).
      kind: one of sign_flip, scaled, gaussian, nan, inf.
      sites: the names of the corrupted sites.
      scale: the corruption's size (see the module; None: its default).
    Example: ``CorruptedUpdates(make_method("fedavg"), "sign_flip", ["site-3"])``.
    """

    name = "corrupted"

    def __init__(self, inner: LocalMethod | dict, kind: str, sites: list[str] | tuple[str, ...],
                 scale: float | None = None):
        super().__init__(inner)
        if kind not in UPDATE_CORRUPTIONS:
            raise FedmiError(f"corrupted updates: unknown kind '{kind}'; kinds: {', '.join(UPDATE_CORRUPTIONS)}")
        self.kind, self.sites = kind, tuple(sites)
        self.scale = DEFAULT_SCALE[kind] if scale is None else float(scale)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "kind": self.kind, "sites": list(self.sites), "scale": self.scale}

    def final(self, state: State, ctx: SiteContext):
        update, kept = self.inner.final(state, ctx)
        if ctx.site not in self.sites:
            return update, kept
        generator = torch_generator(Stream.SIMULATION, ctx.round.seed, ctx.round.round, zlib.crc32(ctx.site.encode()))
        return replace(update, delta=self.corrupt(update.delta, generator)), kept

    def corrupt(self, delta, generator: torch.Generator):
        """The corrupted copy of a delta."""
        out = OrderedDict()
        for k, v in delta.items():
            if not v.is_floating_point():
                out[k] = v
            elif self.kind == "sign_flip":
                out[k] = -self.scale * v
            elif self.kind == "scaled":
                out[k] = self.scale * v
            elif self.kind == "gaussian":
                out[k] = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) * self.scale
            else:
                out[k] = torch.full_like(v, float("nan") if self.kind == "nan" else float("inf"))
        return out

    def __repr__(self) -> str:
        return f"CorruptedUpdates({self.inner!r}, {self.kind}, sites={list(self.sites)}, scale={self.scale})"
