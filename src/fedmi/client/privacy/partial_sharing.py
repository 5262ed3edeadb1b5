"""Partial weight sharing (Yang et al. 2021, survey ref. [84], §VI-A(1), COVID-19 diagnosis from
chest X-rays): sites share the model's feature-learning part and keep its last layers to themselves,
since sharing the whole model "may not fully protect privacy".

The private entries, named by module or glob pattern (`head`, `fc.*`, `*.bias`), never leave a
site. Each round a site starts from the server's shared entries with its own private ones
substituted, trains the whole model as its inner method says, keeps the private entries as site
state and sends an `Update` that omits them: they are absent from the message, not sent as zeros.
The server checks each update against the shared entries alone, aggregates only those (clipping
and noise of client-level DP included) and keeps its own copy of the private ones, which is the
initial model's. A site evaluates with its own private entries; in its first round, or as a new
site, it starts from the server's copy.

With sample-level DP (DP-SGD) the private entries are trained with clipped, noised gradients too:
a part trained on raw gradients would carry each record's influence into the next step's shared
gradient, and one record could then move the shared release by more than the clipping norm.
"""

from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatchcase
from typing import Any, Sequence

from fedmi.client.wrapped import WrappedMethod
from fedmi.core import params as P
from fedmi.core.local import LocalMethod, SiteContext, State, register_method
from fedmi.errors import FedmiError


def matches(name: str, pattern: str) -> bool:
    """Whether a model entry `name` falls under `pattern`: the module of that name (every entry below
    it, `"fc"` takes `"fc.weight"`) or a glob over entry names (`"layer4.*"`, `"*.bias"`)."""
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


@register_method
class PartialSharing(WrappedMethod):
    """Another local method whose entries matching `private` stay at each site (Yang et al. [84]).

    Args:
      inner: the method every site trains with (a `LocalMethod`, or its `spec()`); one whose own
        objective, regulariser or server step would pull the private entries toward the server's
        copy of them (FedProx, SCAFFOLD) is refused.
      private: module names or glob patterns of the entries that never leave a site.
    Example: ``PartialSharing(make_method("fedavg"), private=["head"])``
    """

    name = "partial_sharing"

    def __init__(self, inner: LocalMethod | dict, private: Sequence[str]):
        super().__init__(inner)
        if isinstance(private, str) or not private or not all(isinstance(p, str) and p.strip() for p in private):
            raise FedmiError(f"partial_sharing private must be a list of module names or patterns, got {private!r}")
        self.private = [p.strip() for p in private]
        inner = self.inner
        for hook in ("objective", "regulariser"):
            if inner.overrides(hook):
                raise FedmiError(f"partial_sharing over {inner.name}: its {hook} reads the server's model, whose "
                                 "private entries are not the site's; use a trainer without one (fedavg, fedsgd)")
        if inner.default_aggregator:
            raise FedmiError(f"partial_sharing over {inner.name}: its aggregation ({inner.default_aggregator}) "
                             "needs every entry from every site")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "private": list(self.private)}

    def private_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        unmatched = [p for p in self.private if not any(matches(n, p) for n in names)]
        if unmatched:
            modules = sorted({n.rsplit(".", 1)[0] for n in names})
            raise FedmiError(f"partial sharing: {', '.join(map(repr, unmatched))} names no entry of the model; "
                             f"its modules: {', '.join(modules)}")
        own = {n for n in names if any(matches(n, p) for p in self.private)}
        kept = own | set(self.inner.private_names(names))
        if len(kept) == len(names):
            raise FedmiError(f"partial sharing: {', '.join(self.private)} keeps every entry of the model at the "
                             "sites, so nothing would be shared")
        return tuple(n for n in names if n in kept)

    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        own = (site_state or {}).get("private")
        start = global_params if not own else P.Params((k, own.get(k, v)) for k, v in global_params.items())
        return self.inner.init(start, (site_state or {}).get("inner"), ctx)

    def final(self, state: State, ctx: SiteContext):
        private = set(self.private_names(tuple(ctx.global_params)))
        values = {**state.get("params", {}), **state.get("buffers", {})}
        missing = sorted(private - set(values))
        if missing:
            raise FedmiError(f"partial_sharing over {self.inner.name}: its state holds no {missing[0]} to keep")
        own = {k: values[k].detach().clone() for k in ctx.global_params if k in private}
        update, kept = self.inner.final(state, ctx)
        shared = P.Params((k, v) for k, v in update.delta.items() if k not in private)
        mine = {"private": own, **({"inner": kept} if kept is not None else {})}
        return replace(update, delta=shared), mine

    def undone(self, before, after):
        """The private entries before the undone round, and what the inner method keeps of it."""
        inner = self.inner.undone((before or {}).get("inner"), (after or {}).get("inner"))
        kept = {**({"private": before["private"]} if before and "private" in before else {}),
                **({"inner": inner} if inner is not None else {})}
        return kept or None

    def evaluation_params(self, global_params, site_state):
        params = self.inner.evaluation_params(global_params, (site_state or {}).get("inner"))
        own = (site_state or {}).get("private")
        return params if not own else P.Params((k, own.get(k, v)) for k, v in params.items())

    def __repr__(self) -> str:
        return f"PartialSharing({self.inner!r}, private={self.private})"
