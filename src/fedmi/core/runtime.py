"""The runtime interface: the only door between the server's round loop and the sites.

A runtime owns the sites (their data, their site states and the model code that runs there) and
hands the server nothing but `SiteInfo`s, `Update`s and metric dicts. fedmi's runtimes are
backends for the same local methods: `fedmi.runtime` (sequential, vectorised, process pool) and
`fedmi.runtime.flower.grid` (Flower's deployment and simulation runtimes).
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

from fedmi.core import params as P
from fedmi.core.local import LocalMethod
from fedmi.core.registry import Registry
from fedmi.core.types import Rejected, RoundInfo, SiteInfo, Update


class Runtime(Protocol):
    """How a round's local work reaches the sites.

    Example (a runtime that runs each site in this process, one after another):

        class MyRuntime:
            def site_infos(self): return [s.info for s in self.sites]
            def train(self, method, params, sites, round_info):
                for name in sites:
                    yield train_site(...)         # see fedmi.core.site_loop
            def evaluate(self, params, method=None, sites=None, split="test"): ...
            def close(self): pass
    """

    def site_infos(self) -> list[SiteInfo]:
        """Name and training-set size of every site available now, in the order that keys their
        random streams. The runner asks at every round boundary: a runtime whose sites come and go
        (a deployment) answers with those that joined and without those that left."""

    def train(self, method: LocalMethod, params: P.ParamsT, sites: Sequence[str],
              round_info: RoundInfo) -> Iterator[Update | Rejected]:
        """Broadcast `params` to `sites`, run `method` at each, and yield their updates as they arrive.

        Args:
          method: the local method (its `init`/`objective`/`step`/`final`).
          params: the global parameters and buffers.
          sites: names of the selected sites.
          round_info: the round (index, count, seed).
        Yields:
          One `Update` per site that answered; `Rejected` for a reply that is not an update;
          nothing for a site that did not answer.
        """

    def evaluate(self, params: P.ParamsT, method: LocalMethod | None = None, sites: Sequence[str] | None = None,
                 split: str = "test") -> dict[str, dict]:
        """Each site's metrics of `params` (personalised by `method` where it keeps site state)."""

    def close(self) -> None:
        """Release workers and shared memory; a no-op for in-process runtimes."""


# Backends register a factory `(model, sites, task, workers) -> Runtime` under their name where
# they are defined (`@RUNTIMES.register("sequential")`); `fedmi.runtime.make_runtime` builds one.
RUNTIMES = Registry("runtime")
