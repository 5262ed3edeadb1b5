"""In-process runtime: every site runs in this process, one after another, on one reused model."""

from __future__ import annotations

from typing import Iterator, Sequence

from torch import nn

from fedmi.client.evaluation import evaluate_site
from fedmi.client.trainers import LocalTrainer
from fedmi.core import params as P
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.types import RoundInfo, SiteData, Update
from fedmi.runtime.base import SitesByName


class InProcessRuntime(SitesByName):
    def __init__(self, model: nn.Module, sites: Sequence[SiteData]):
        super().__init__(sites)
        self._model = model

    def close(self) -> None:
        pass

    def train(self, trainer: LocalTrainer, params: P.ParamsT, sites: Sequence[str],
              round_info: RoundInfo) -> Iterator[Update]:
        for name in sites:
            site = self._site(name)
            # Each site's randomness depends only on (seed, round, site): order and runtime do not matter.
            rng = torch_generator(Stream.LOCAL_TRAINING, round_info.seed, round_info.round, self._index[name])
            yield trainer.train(self._model, params, site, round_info, rng)

    def evaluate(self, params: P.ParamsT, sites: Sequence[str] | None = None, split: str = "test") -> dict[str, dict]:
        names = list(self._sites) if sites is None else sites
        return {n: evaluate_site(self._model, params, self._site(n), split) for n in names}
