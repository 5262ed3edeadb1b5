"""The runtime interface: the only door between the server's round loop and the sites."""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

from fedmi.client.trainers import LocalTrainer
from fedmi.core import params as P
from fedmi.core.types import Rejected, RoundInfo, SiteData, SiteInfo, Update
from fedmi.errors import FedmiError


class Runtime(Protocol):
    def site_infos(self) -> list[SiteInfo]:
        """Name and training-set size of every site."""

    def train(self, trainer: LocalTrainer, params: P.ParamsT, sites: Sequence[str],
              round_info: RoundInfo) -> Iterator[Update | Rejected]:
        """Broadcast `params` to `sites`, run `trainer` at each, yield their updates as they arrive
        (a reply that cannot be read as an update: `Rejected`; a site that does not answer: nothing)."""

    def evaluate(self, params: P.ParamsT, sites: Sequence[str] | None = None, split: str = "test") -> dict[str, dict]:
        """Each site's metrics of `params` on its own split (metrics only cross the boundary)."""

    def close(self) -> None:
        """Release workers and shared memory; a no-op for in-process runtimes."""


class SitesByName:
    """The sites a runtime holds in this process, by name; an unknown name is a clear error."""

    def __init__(self, sites: Sequence[SiteData]):
        self._sites = {s.name: s for s in sites}
        self._index = {s.name: i for i, s in enumerate(sites)}  # the site's key in its random streams

    def site_infos(self) -> list[SiteInfo]:
        return [s.info for s in self._sites.values()]

    def _site(self, name: str) -> SiteData:
        if name not in self._sites:
            raise FedmiError(f"no site named '{name}' in this federation")
        return self._sites[name]
