"""Sequential runtime: every site in this process, one after another, on one shared model object.

Each site's round is the site loop's (`fedmi.core.site_loop.train_site`), with every site's batches
planned in one call; evaluation is `evaluate_site` at each site in turn.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from torch import nn

from fedmi.core import params as P
from fedmi.core.batches import plan_batches
from fedmi.core.local import LocalMethod, SiteStates
from fedmi.core.runtime import RUNTIMES
from fedmi.core.site_loop import evaluate_site, train_site
from fedmi.core.tasks import BinaryTask, Task
from fedmi.core.types import RoundInfo, SiteData, SiteInfo, Update
from fedmi.errors import FedmiError


class SitesByName:
    """The sites a runtime holds in this process, by name; an unknown name is a clear error."""

    def __init__(self, sites: Sequence[SiteData]):
        self._sites = {s.name: s for s in sites}
        self._index = {s.name: i for i, s in enumerate(sites)}  # the site's key in its random streams
        if len(self._sites) != len(sites):
            raise FedmiError("site names repeat")
        self._infos: list[SiteInfo] | None = None  # the runner asks every round; labels are counted once

    def site_infos(self) -> list[SiteInfo]:
        if self._infos is None:
            self._infos = [s.info for s in self._sites.values()]
        return list(self._infos)

    def _site(self, name: str) -> SiteData:
        if name not in self._sites:
            raise FedmiError(f"no site named '{name}' in this federation")
        return self._sites[name]


class SequentialRuntime(SitesByName):
    """Each site in turn in this process; site states are kept here, on the sites' side."""

    def __init__(self, model: nn.Module, sites: Sequence[SiteData], task: Task | None = None):
        super().__init__(sites)
        self._model = model
        self.task = task or BinaryTask()
        self.site_states = SiteStates()

    def close(self) -> None:
        pass

    def train(self, method: LocalMethod, params: P.ParamsT, sites: Sequence[str],
              round_info: RoundInfo) -> Iterator[Update]:
        chosen = [self._site(name) for name in sites]
        if not chosen:
            return
        plan = plan_batches(method.schedule, [s.num_train for s in chosen], [self._index[s.name] for s in chosen],
                            round_info.seed, round_info.round)  # every site's batches in one call
        for j, site in enumerate(chosen):
            update, kept = train_site(method, self._model, self.task, site, params, self.site_states.get(site.name),
                                      round_info, self._index[site.name], plan.site_batches(j))
            self.site_states.put(site.name, kept)
            yield update

    def evaluate(self, params: P.ParamsT, method: LocalMethod | None = None, sites: Sequence[str] | None = None,
                 split: str = "test") -> dict[str, dict]:
        names = list(self._sites) if sites is None else sites
        out = {}
        for n in names:
            own = params if method is None else method.evaluation_params(params, self.site_states.get(n))
            out[n] = evaluate_site(self._model, self.task, own, self._site(n), split)
        return out


@RUNTIMES.register("sequential")
def _make(model: nn.Module, sites: Sequence[SiteData], task: Task | None, workers: int | None) -> SequentialRuntime:
    return SequentialRuntime(model, sites, task)
